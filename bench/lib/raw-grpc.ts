/**
 * A lean gRPC client for the load generators (and unary calls in the Connect protocol, to compare):
 * plain node:http2 streams, length-prefixed messages decoded only as far as the benchmark reads them.
 * The load generators share the server's two cores, so every microsecond they spend per delivery is taken from the server being measured; Connect-es's
 * client pipeline cost about as much CPU as the server itself (bench/results before 2026-11-26).
 */
import http2 from "node:http2";
import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";

export class GrpcError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

/** gRPC status numbers → the names the reports use. */
const codeNames = [
  "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
  "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
  "Internal", "Unavailable", "DataLoss", "Unauthenticated",
];

export function envelope(message: Uint8Array): Buffer {
  const framed = Buffer.allocUnsafe(5 + message.length);
  framed[0] = 0;
  framed.writeUInt32BE(message.length, 1);
  framed.set(message, 5);
  return framed;
}

/** Splits a byte stream into gRPC messages. */
class EnvelopeReader {
  private pending: Buffer = Buffer.alloc(0);
  constructor(private readonly onMessage: (message: Buffer) => void) {}
  push(chunk: Buffer): void {
    let data = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
    while (data.length >= 5) {
      const length = data.readUInt32BE(1);
      if (data.length < 5 + length) break;
      this.onMessage(data.subarray(5, 5 + length));
      data = data.subarray(5 + length);
    }
    this.pending = data;
  }
}

function statusOf(headers: http2.IncomingHttpHeaders): GrpcError | undefined {
  const status = headers["grpc-status"];
  if (status === undefined || status === "0") return undefined;
  const message = decodeURIComponent(String(headers["grpc-message"] ?? ""));
  return new GrpcError(codeNames[Number(status)] ?? String(status), message);
}

export class RawGrpc {
  readonly sessions: http2.ClientHttp2Session[];
  private next = 0;

  constructor(baseUrl: string, connections: number) {
    this.sessions = Array.from({ length: connections }, () => {
      const session = http2.connect(baseUrl, { settings: { initialWindowSize: 1 << 20 }, peerMaxConcurrentStreams: 100_000 });
      session.on("error", () => {});
      return session;
    });
  }

  private nextSession(): http2.ClientHttp2Session {
    return this.sessions[this.next++ % this.sessions.length]!;
  }

  private request(path: string, authorization: string, extra: http2.OutgoingHttpHeaders = {}): http2.ClientHttp2Stream {
    return this.nextSession().request({
      ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", authorization, ...extra,
    });
  }

  /** Resolves with the response message; rejects with GrpcError. */
  unary(path: string, request: Uint8Array, authorization: string, timeoutMs: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const stream = this.request(path, authorization, { "grpc-timeout": `${timeoutMs}m` });
      let response: Buffer | undefined;
      let error: GrpcError | undefined;
      const reader = new EnvelopeReader((message) => (response = Buffer.from(message)));
      const timer = setTimeout(() => {
        error = new GrpcError("DeadlineExceeded", "client deadline");
        stream.close(http2.constants.NGHTTP2_CANCEL);
      }, timeoutMs + 1000);
      stream.on("response", (headers) => (error ??= statusOf(headers)));
      stream.on("trailers", (trailers) => (error ??= statusOf(trailers)));
      stream.on("data", (chunk: Buffer) => reader.push(chunk));
      stream.on("error", () => {});
      stream.on("close", () => {
        clearTimeout(timer);
        if (error) reject(error);
        else if (response) resolve(response);
        else reject(new GrpcError(stream.rstCode ? "Unavailable" : "Internal", `no response (RST ${stream.rstCode})`));
      });
      stream.end(envelope(request));
    });
  }

  /**
   * The same call in the Connect protocol (binary): the body is the bare message, errors are an HTTP
   * status with a JSON body. Resolves with the response message; rejects with GrpcError.
   */
  connectUnary(path: string, request: Uint8Array, authorization: string, timeoutMs: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const stream = this.nextSession().request({
        ":method": "POST", ":path": path, "content-type": "application/proto", "connect-protocol-version": "1",
        "connect-timeout-ms": String(timeoutMs), authorization,
      });
      let status = 0;
      const chunks: Buffer[] = [];
      let failure: GrpcError | undefined;
      const timer = setTimeout(() => {
        failure = new GrpcError("DeadlineExceeded", "client deadline");
        stream.close(http2.constants.NGHTTP2_CANCEL);
      }, timeoutMs + 1000);
      stream.on("response", (headers) => (status = Number(headers[":status"])));
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("error", () => {});
      stream.on("close", () => {
        clearTimeout(timer);
        const body = Buffer.concat(chunks);
        if (failure) return reject(failure);
        if (status === 200) return resolve(body);
        if (status === 0) return reject(new GrpcError(stream.rstCode ? "Unavailable" : "Internal", `no response (RST ${stream.rstCode})`));
        let error: { code?: string; message?: string } = {};
        try {
          error = JSON.parse(body.toString("utf8"));
        } catch {}
        // Connect's snake_case codes ("resource_exhausted") as the gRPC names the reports use ("ResourceExhausted").
        const code = (error.code ?? `http ${status}`).replace(/(?:^|_)(\w)/g, (_, c: string) => c.toUpperCase());
        reject(new GrpcError(code, error.message ?? ""));
      });
      stream.end(request);
    });
  }

  /** Calls onMessage for each streamed message; resolves when the stream ends (with its status). */
  serverStream(path: string, request: Uint8Array, authorization: string, signal: AbortSignal, onMessage: (message: Buffer) => void): Promise<GrpcError | undefined> {
    return new Promise((resolve) => {
      const stream = this.request(path, authorization);
      let error: GrpcError | undefined;
      const reader = new EnvelopeReader(onMessage);
      const cancel = () => {
        error ??= new GrpcError("Canceled", "client cancelled");
        stream.close(http2.constants.NGHTTP2_CANCEL);
      };
      signal.addEventListener("abort", cancel, { once: true });
      stream.on("response", (headers) => (error ??= statusOf(headers)));
      stream.on("trailers", (trailers) => (error ??= statusOf(trailers)));
      stream.on("data", (chunk: Buffer) => reader.push(chunk));
      stream.on("error", () => {});
      stream.on("close", () => {
        signal.removeEventListener("abort", cancel);
        if (!error && stream.rstCode) error = new GrpcError(stream.rstCode === http2.constants.NGHTTP2_ENHANCE_YOUR_CALM ? "ResourceExhausted" : "Unavailable", `RST ${stream.rstCode}`);
        resolve(error);
      });
      stream.end(envelope(request));
    });
  }

  close(): void {
    for (const session of this.sessions) session.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// The few messages the load generators write and read (field numbers from proto/parley/v1).

export function subscribeRequest(includeMessages: boolean): Uint8Array {
  const writer = new BinaryWriter();
  if (includeMessages) writer.tag(1, WireType.Varint).bool(true);
  return writer.finish();
}

export function sendMessageRequest(chatId: string, text: string): Uint8Array {
  return new BinaryWriter().tag(1, WireType.LengthDelimited).string(chatId).tag(2, WireType.LengthDelimited).string(text).finish();
}

/** Calls read for each field of a message; a field read does not consume (returns false) is skipped. */
function forEachField(bytes: Uint8Array, read: (field: number, reader: BinaryReader) => boolean): void {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (!read(field, reader)) reader.skip(wireType);
  }
}

/** SendMessageResponse.message.id */
export function sentMessageId(response: Uint8Array): string {
  let id = "";
  forEachField(response, (field, reader) => {
    if (field !== 1) return false;
    forEachField(reader.bytes(), (f, message) => f === 1 && ((id = message.string()), true));
    return true;
  });
  return id;
}

export interface NotificationSummary {
  /** The event's field name in Notification's oneof. */
  kind: "ready" | "messageCreated" | "chatCreated" | "memberAdded" | "memberRemoved" | "readUpdated" | "heartbeat" | "none";
  chatId: string;
  sequence: number;
  /** The message body's text, when the stream includes messages. */
  text?: string;
}

const eventFields: Record<number, NotificationSummary["kind"]> = {
  3: "ready", 4: "messageCreated", 5: "chatCreated", 6: "memberAdded", 7: "memberRemoved", 8: "readUpdated", 9: "heartbeat",
};

export function readNotification(bytes: Uint8Array): NotificationSummary {
  const out: NotificationSummary = { kind: "none", chatId: "", sequence: 0 };
  forEachField(bytes, (field, reader) => {
    const kind = eventFields[field];
    if (kind === undefined) return false;
    out.kind = kind;
    if (kind !== "messageCreated") return false;
    forEachField(reader.bytes(), (f, created) => {
      if (f === 1) out.chatId = created.string();
      else if (f === 3) out.sequence = Number(created.int64());
      else if (f === 5) forEachField(created.bytes(), (mf, message) => mf === 4 && ((out.text = message.string()), true));
      else return false;
      return true;
    });
    return true;
  });
  return out;
}

/** ListMessagesRequest for the newest page_size messages. */
export function newestMessagesRequest(chatId: string, pageSize: number): Uint8Array {
  const newestFirst = 1; // Order.NEWEST_FIRST
  return new BinaryWriter()
    .tag(1, WireType.LengthDelimited).string(chatId)
    .tag(2, WireType.Varint).int32(pageSize)
    .tag(8, WireType.Varint).int32(newestFirst)
    .finish();
}

/** ListMessagesResponse: how many messages, and the first one's sequence. */
export function readMessagePage(bytes: Uint8Array): { count: number; firstSequence: number } {
  let count = 0;
  let firstSequence = 0;
  forEachField(bytes, (field, reader) => {
    if (field !== 1) return false;
    const message = reader.bytes();
    if (++count === 1) forEachField(message, (f, m) => f === 5 && ((firstSequence = Number(m.int64())), true));
    return true;
  });
  return { count, firstSequence };
}
