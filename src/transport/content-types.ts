/** The request content types the transport code tells apart, in one place. */

/**
 * Binary messages in 5-byte envelopes (flags, big-endian length): gRPC, gRPC-Web and Connect streaming
 * frame each message the same way; only the end of the stream differs.
 */
export const ENVELOPED_BINARY = /^application\/(grpc|grpc\+proto|grpc-web|grpc-web\+proto|connect\+proto)(;|$)/i;

/** Connect unary in binary: the body is the message itself. */
export const CONNECT_UNARY_BINARY = /^application\/proto(;|$)/i;

/** gRPC-Web's text mode: the binary gRPC-Web body in base64. */
const GRPC_WEB_TEXT = /^application\/grpc-web-text(\+proto)?(;|$)/i;

/** What gRPC and gRPC-Web clients send (their errors travel as grpc-status, not as HTTP statuses). */
export function grpcFlavour(contentType: string): "grpc" | "grpc-web" | "grpc-web-text" | undefined {
  if (GRPC_WEB_TEXT.test(contentType)) return "grpc-web-text";
  if (/^application\/grpc-web([+;]|$)/i.test(contentType)) return "grpc-web";
  if (/^application\/grpc([+;]|$)/i.test(contentType)) return "grpc";
  return undefined;
}
