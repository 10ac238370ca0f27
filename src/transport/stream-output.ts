import http2 from "node:http2";
import type http from "node:http";
import { toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextKey, type HandlerContext } from "@connectrpc/connect";
import { isUnavailable } from "../errors.js";
import type { StreamOutput } from "../services/event-queue.js";
import { ENVELOPED_BINARY } from "./content-types.js";

type NodeResponse = http.ServerResponse | http2.Http2ServerResponse;

/** The Node.js response of a server-streaming RPC, put into its context by the server. */
export const nodeResponseKey = createContextKey<NodeResponse | undefined>(undefined, { description: "Node.js response" });


/** Connect's default compressMinBytes (the routers do not change it): smaller messages go uncompressed. */
const CONNECT_COMPRESS_MIN_BYTES = 1024;

/**
 * What the transport does for a server stream of the given message type, below Connect:
 * - write: one event reaches many streams, and Connect would encode it and pass it through about
 *   seven async layers once per stream. Here it is encoded once (see envelopeOf) and written straight
 *   to the response, where the bytes are exactly what Connect would write (binary codec, message not
 *   compressed) and Connect has sent the headers. Otherwise it returns undefined and the service
 *   yields the message to Connect as usual. Ordering holds because Connect pulls the next message
 *   only after it wrote the previous one. Ends and errors still go through Connect.
 * - cutOff: see StreamOutput. HTTP/2 resets the stream with the code that gRPC and Connect clients
 *   report as the error's code (see resetCodeFor); HTTP/1.1 has no per-request reset, so the
 *   connection closes.
 */
export function streamOutput<Desc extends DescMessage>(ctx: HandlerContext, schema: Desc): StreamOutput<MessageShape<Desc>> | undefined {
  const res = ctx.values.get(nodeResponseKey);
  if (res === undefined) return undefined;
  // The client's own content type: a gRPC-Web text request reaches Connect as binary (grpc-web-text.ts),
  // but its response must pass through the text encoding, so it is never written here.
  const binary = ENVELOPED_BINARY.test(res.req.headers["content-type"] ?? "");
  const compressed = ctx.responseHeader.has("grpc-encoding") || ctx.responseHeader.has("connect-content-encoding");
  return {
    write(message) {
      if (!binary || !res.headersSent) return undefined;
      const envelope = envelopeOf(schema, message);
      if (compressed && envelope.length - 5 >= CONNECT_COMPRESS_MIN_BYTES) return undefined;
      return writeEnvelope(res, envelope, ctx.signal);
    },
    cutOff(error) {
      if (res.writableFinished) return;
      if (res instanceof http2.Http2ServerResponse) {
        if (!res.stream.destroyed) res.stream.close(resetCodeFor(error));
        // Connect's writer waits for "drain" or "error", and a reset stream emits neither: wake it, so it
        // finds the call aborted and ends the handler (which frees the stream's slot and listeners).
        res.emit("drain");
      } else {
        res.destroy();
      }
    },
  };
}

/**
 * REFUSED_STREAM for UNAVAILABLE (shutdown: the client should reconnect), ENHANCE_YOUR_CALM for the
 * rest (a client that fell behind: RESOURCE_EXHAUSTED).
 */
function resetCodeFor(error: unknown): number {
  const unavailable = isUnavailable(error) || (error instanceof ConnectError && error.code === Code.Unavailable);
  return unavailable ? http2.constants.NGHTTP2_REFUSED_STREAM : http2.constants.NGHTTP2_ENHANCE_YOUR_CALM;
}

const envelopes = new WeakMap<object, Uint8Array>();

/** The enveloped encoding of a message, made once per message object (events are never mutated). */
function envelopeOf<Desc extends DescMessage>(schema: Desc, message: MessageShape<Desc>): Uint8Array {
  let envelope = envelopes.get(message);
  if (envelope === undefined) {
    const bytes = toBinary(schema, message);
    envelope = new Uint8Array(5 + bytes.length);
    new DataView(envelope.buffer).setUint32(1, bytes.length);
    envelope.set(bytes, 5);
    envelopes.set(message, envelope);
  }
  return envelope;
}

/**
 * Writes; true when the response can take more, else a promise that resolves when it can (the
 * buffer limit of flow control: the wait Connect would make). An aborted call writes nothing and
 * answers true: the stream's loop then finds its signal aborted.
 */
function writeEnvelope(res: NodeResponse, envelope: Uint8Array, signal: AbortSignal): true | Promise<void> {
  const destroyed = res instanceof http2.Http2ServerResponse ? res.stream.destroyed : res.destroyed;
  if (signal.aborted || destroyed || res.writableEnded) return true;
  if ((res as http.ServerResponse).write(envelope)) return true;
  return new Promise<void>((resolve) => {
    const done = () => {
      res.off("drain", done);
      res.off("close", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    res.on("drain", done);
    res.on("close", done);
    signal.addEventListener("abort", done);
  });
}
