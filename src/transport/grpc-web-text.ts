// gRPC-Web's text mode (`application/grpc-web-text`): the binary gRPC-Web body in base64. Google's
// grpc-web client uses it by default, and needs it for server streams. Connect serves only the binary
// form, so a text request is decoded into it on the way in and its response encoded on the way out;
// in between it is the same gRPC-Web call through the same handler.
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalServerRequest, UniversalServerResponse } from "@connectrpc/connect/protocol";

const BINARY_CONTENT_TYPE = "application/grpc-web+proto";
const TEXT_CONTENT_TYPE = "application/grpc-web-text+proto";

/**
 * The request in binary gRPC-Web. readMaxBytes limits the decoded message as usual; the text itself is
 * limited to what a message of that size takes in base64, with room for line breaks, because
 * whitespace and padding decode to nothing and would otherwise pass unmeasured.
 */
export function fromGrpcWebText(req: UniversalServerRequest, readMaxBytes: number): UniversalServerRequest {
  const header = new Headers(req.header);
  header.set("content-type", BINARY_CONTENT_TYPE);
  header.delete("content-length");
  const body = req.body as AsyncIterable<Uint8Array>;
  const maxTextBytes = 2 * 4 * Math.ceil((readMaxBytes + 5) / 3);
  return { ...req, header, body: decodeBase64(body, maxTextBytes) };
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
async function* decodeBase64(body: AsyncIterable<Uint8Array>, maxTextBytes: number): AsyncIterable<Uint8Array> {
  let pending = "";
  let received = 0;
  for await (const chunk of body) {
    received += chunk.length;
    if (received > maxTextBytes) {
      throw new ConnectError(`request text larger than ${maxTextBytes} bytes (base64 of PARLEY_MAX_REQUEST_BYTES)`, Code.ResourceExhausted);
    }
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
