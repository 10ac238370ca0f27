import zlib from "node:zlib";
import { fromBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextKey, createContextValues, type Interceptor } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";
import { CONNECT_UNARY_BINARY, ENVELOPED_BINARY } from "./content-types.js";

/**
 * Connect answers a request whose protobuf bytes do not decode with INTERNAL, before any interceptor
 * runs. The contract wants INVALID_ARGUMENT, so unary and server-streaming requests in binary formats
 * are decoded here first; a bad one is passed on as an empty message carrying a flag, and the
 * interceptor below turns the flag into INVALID_ARGUMENT in whatever protocol the client speaks.
 */
const undecodableBody = createContextKey<string | undefined>(undefined);

const COMPRESSED_FLAG = 0b1;

export function withBodyCheck(handler: UniversalHandler, readMaxBytes: number): UniversalHandler {
  const kind = handler.method.methodKind;
  if (kind !== "unary" && kind !== "server_streaming") return handler;
  const checked = async (req: UniversalServerRequest) => {
    const contentType = req.header.get("content-type") ?? "";
    const enveloped = ENVELOPED_BINARY.test(contentType);
    if ((!enveloped && !CONNECT_UNARY_BINARY.test(contentType)) || !isByteStream(req.body)) return handler(req);
    let read: { bytes: Uint8Array; complete: boolean };
    try {
      read = await readUpTo(req.body, readMaxBytes + 5);
    } catch (error) {
      // Connect answers a body that fails while it reads (in the client's protocol, with the error's code).
      return handler({ ...req, body: failing(error) });
    }
    const { bytes, complete } = read;
    const replay = { ...req, body: replayThenRest(bytes, complete ? undefined : req.body) };
    if (!complete) return handler(replay); // too large: Connect enforces readMaxBytes itself
    const payload = enveloped ? unenvelope(bytes, req.header, readMaxBytes) : bytes;
    if (payload === undefined) return handler(replay);
    let problem = typeof payload === "string" ? payload : undefined;
    if (typeof payload !== "string") {
      try {
        fromBinary(handler.method.input, payload);
      } catch (error) {
        problem = (error as Error).message;
      }
    }
    if (problem === undefined) return handler(replay);
    const contextValues = createContextValues();
    contextValues.set(undecodableBody, `request body is not a valid ${handler.method.input.typeName} (${problem})`);
    const empty = enveloped ? new Uint8Array(5) : new Uint8Array(0);
    const header = new Headers(req.header);
    header.set("content-length", String(empty.length));
    header.delete("grpc-encoding");
    header.delete("connect-content-encoding");
    return handler({ ...req, header, body: replayThenRest(empty, undefined), contextValues });
  };
  return Object.assign(checked, handler);
}

/** Throws INVALID_ARGUMENT for a request whose body withBodyCheck could not decode. */
export const rejectUndecodableBody: Interceptor = (next) => async (req) => {
  const problem = req.contextValues.get(undecodableBody);
  if (problem !== undefined) throw new ConnectError(problem, Code.InvalidArgument);
  return next(req);
};

/**
 * The message of the request's single envelope, decompressed; a string saying what is wrong with the
 * envelope; or undefined when Connect should judge it (a decompressed size over the limit).
 */
function unenvelope(bytes: Uint8Array, header: Headers, readMaxBytes: number): Uint8Array | string | undefined {
  if (bytes.length < 5) return "incomplete message envelope";
  const length = new DataView(bytes.buffer, bytes.byteOffset + 1, 4).getUint32(0);
  if (length > readMaxBytes) return undefined; // Connect answers RESOURCE_EXHAUSTED
  if (bytes.length !== 5 + length) return "the envelope's length does not match the body (exactly one message expected)";
  const message = bytes.subarray(5);
  if ((bytes[0]! & COMPRESSED_FLAG) === 0) return message;
  const encoding = header.get("grpc-encoding") ?? header.get("connect-content-encoding");
  const options = { maxOutputLength: readMaxBytes };
  try {
    if (encoding === "gzip") return zlib.gunzipSync(message, options);
    if (encoding === "br") return zlib.brotliDecompressSync(message, options);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ERR_BUFFER_TOO_LARGE") return undefined;
    return `cannot decompress the message (${encoding})`;
  }
  return `compressed message without a supported encoding (gzip or br), got ${encoding ?? "none"}`;
}

/**
 * Streaming requests are decoded lazily while the handler reads them: a message that does not
 * decode becomes INVALID_ARGUMENT there too.
 */
export const rejectUndecodableStreamMessages: Interceptor = (next) => async (req) => {
  if (!req.stream) return next(req);
  return next({ ...req, message: invalidArgumentOnParseError(req.message) });
};

async function* invalidArgumentOnParseError<T>(messages: AsyncIterable<T>): AsyncIterable<T> {
  try {
    yield* messages;
  } catch (error) {
    const connectError = ConnectError.from(error);
    // Connect reports undecodable stream messages as INTERNAL.
    const undecodable = /^(parse binary|received compressed envelope)/.test(connectError.rawMessage);
    if (connectError.code === Code.Internal && undecodable) {
      throw new ConnectError(`request message does not decode (${connectError.rawMessage})`, Code.InvalidArgument);
    }
    throw error;
  }
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

/** A request body that fails when read. */
async function* failing(error: unknown): AsyncIterable<Uint8Array> {
  throw error;
}

async function* replayThenRest(first: Uint8Array, rest: AsyncIterable<Uint8Array> | undefined) {
  yield first;
  if (rest) yield* rest;
}
