import type { UniversalServerRequest, UniversalServerResponse } from "@connectrpc/connect/protocol";

/**
 * gRPC-Web's text mode (`application/grpc-web-text`): the binary gRPC-Web body in base64. Google's
 * grpc-web client uses it by default, and needs it for server streams. Connect serves only the binary
 * form, so a text request is decoded into it on the way in and its response encoded on the way out;
 * in between it is the same gRPC-Web call through the same handler.
 */
const GRPC_WEB_TEXT = /^application\/grpc-web-text(\+proto)?(;|$)/i;
const BINARY_CONTENT_TYPE = "application/grpc-web+proto";
const TEXT_CONTENT_TYPE = "application/grpc-web-text+proto";

export function isGrpcWebText(contentType: string | undefined): boolean {
  return GRPC_WEB_TEXT.test(contentType ?? "");
}

export function fromGrpcWebText(req: UniversalServerRequest): UniversalServerRequest {
  const header = new Headers(req.header);
  header.set("content-type", BINARY_CONTENT_TYPE);
  header.delete("content-length");
  const body = req.body as AsyncIterable<Uint8Array>;
  return { ...req, header, body: decodeBase64(body) };
}

/** Each chunk of the response (a message or the trailers frame) becomes base64 of its own, padded as needed. */
export function toGrpcWebText(res: UniversalServerResponse): UniversalServerResponse {
  const header = new Headers(res.header);
  if (header.has("content-type")) header.set("content-type", TEXT_CONTENT_TYPE);
  header.delete("content-length");
  return { ...res, header, body: res.body && encodeBase64(res.body) };
}

async function* encodeBase64(body: AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array> {
  for await (const chunk of body) yield Buffer.from(Buffer.from(chunk).toString("base64"), "latin1");
}

/**
 * Decodes in whole groups of four characters, so chunks may split anywhere and a client may pad each
 * message it writes (padding can then appear mid-body, where one decode of the whole text would stop).
 */
async function* decodeBase64(body: AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array> {
  let pending = "";
  for await (const chunk of body) {
    pending += Buffer.from(chunk).toString("latin1").replace(/\s+/g, "");
    const whole = pending.length - (pending.length % 4);
    if (whole === 0) continue;
    yield decodeGroups(pending.slice(0, whole));
    pending = pending.slice(whole);
  }
  // A truncated last group decodes to what it holds; a broken body then fails to parse as a message.
  if (pending) yield Buffer.from(pending, "base64");
}

function decodeGroups(text: string): Buffer {
  if (!text.includes("=")) return Buffer.from(text, "base64");
  const parts: Buffer[] = [];
  for (let i = 0; i < text.length; i += 4) parts.push(Buffer.from(text.slice(i, i + 4), "base64"));
  return Buffer.concat(parts);
}
