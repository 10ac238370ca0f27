import zlib from "node:zlib";
import { fromBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextKey, createContextValues, type Interceptor } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";

/**
 * Connect answers a request whose protobuf bytes do not decode with INTERNAL, before any interceptor
 * runs. The contract wants INVALID_ARGUMENT, so unary and server-streaming requests in binary formats
 * are decoded here first; a bad one is passed on as an empty message carrying a flag, and the
 * interceptor below turns the flag into INVALID_ARGUMENT in whatever protocol the client speaks.
 */
const undecodableBody = createContextKey<string | undefined>(undefined);

/** Connect unary binary: the body is the message. */
const RAW = /^application\/proto(;|$)/i;
/** gRPC, gRPC-Web and Connect streaming binary: the message is in a 5-byte-prefixed envelope. */
const ENVELOPED = /^application\/(grpc|grpc\+proto|grpc-web|grpc-web\+proto|connect\+proto)(;|$)/i;
const COMPRESSED_FLAG = 0b1;

export function withBodyCheck(handler: UniversalHandler, readMaxBytes: number): UniversalHandler {
  const kind = handler.method.methodKind;
  if (kind !== "unary" && kind !== "server_streaming") return handler;
  const checked = async (req: UniversalServerRequest) => {
    const contentType = req.header.get("content-type") ?? "";
    const enveloped = ENVELOPED.test(contentType);
    if ((!enveloped && !RAW.test(contentType)) || !isByteStream(req.body)) return handler(req);
    const { bytes, complete } = await readUpTo(req.body, readMaxBytes + 5);
    const replay = { ...req, body: replayThenRest(bytes, complete ? undefined : req.body) };
    if (!complete) return handler(replay); // too large: Connect enforces readMaxBytes itself
    const payload = enveloped ? unenvelope(bytes, req.header, readMaxBytes) : bytes;
    if (payload === undefined) return handler(replay);
    try {
      fromBinary(handler.method.input, payload);
      return handler(replay);
    } catch (error) {
      const contextValues = createContextValues();
      contextValues.set(undecodableBody, `request body is not a valid ${handler.method.input.typeName}: ${(error as Error).message}`);
      const empty = enveloped ? new Uint8Array(5) : new Uint8Array(0);
      const header = new Headers(req.header);
      header.set("content-length", String(empty.length));
      return handler({ ...req, header, body: replayThenRest(empty, undefined), contextValues });
    }
  };
  return Object.assign(checked, handler);
}

/** Throws INVALID_ARGUMENT for a request whose body withBodyCheck could not decode. */
export const rejectUndecodableBody: Interceptor = (next) => async (req) => {
  const problem = req.contextValues.get(undecodableBody);
  if (problem !== undefined) throw new ConnectError(problem, Code.InvalidArgument);
  return next(req);
};

/** The message of a single envelope, decompressed; undefined when Connect should judge it. */
function unenvelope(bytes: Uint8Array, header: Headers, readMaxBytes: number): Uint8Array | undefined {
  if (bytes.length < 5) return undefined;
  const length = new DataView(bytes.buffer, bytes.byteOffset + 1, 4).getUint32(0);
  if (bytes.length !== 5 + length) return undefined;
  const message = bytes.subarray(5);
  if ((bytes[0]! & COMPRESSED_FLAG) === 0) return message;
  const encoding = header.get("grpc-encoding") ?? header.get("connect-content-encoding");
  const options = { maxOutputLength: readMaxBytes };
  try {
    if (encoding === "gzip") return zlib.gunzipSync(message, options);
    if (encoding === "br") return zlib.brotliDecompressSync(message, options);
  } catch {
    // A broken compressed stream: Connect reports that itself.
  }
  return undefined;
}

function isByteStream(body: unknown): body is AsyncIterable<Uint8Array> {
  return typeof body === "object" && body !== null && Symbol.asyncIterator in body;
}

async function readUpTo(body: AsyncIterable<Uint8Array>, max: number) {
  const chunks: Uint8Array[] = [];
  let size = 0;
  const iterator = body[Symbol.asyncIterator]();
  while (size <= max) {
    const next = await iterator.next();
    if (next.done) return { bytes: Buffer.concat(chunks), complete: true };
    chunks.push(next.value);
    size += next.value.length;
  }
  return { bytes: Buffer.concat(chunks), complete: false };
}

async function* replayThenRest(first: Uint8Array, rest: AsyncIterable<Uint8Array> | undefined) {
  yield first;
  if (rest) yield* rest;
}
