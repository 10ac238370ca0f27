import http from "node:http";
import http2 from "node:http2";
import net from "node:net";

const HTTP2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n");
/** Header limits well above the 8 KiB token limit, so an oversized token gets a clean UNAUTHENTICATED. */
const MAX_HEADER_BYTES = 256 * 1024;

type Handler = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => void;

/** Parley's HTTP/1.1 and h2c servers with its limits, both behind one port (see createOnePortServer). */
export function createHttpServers(handle: Handler): { http1: http.Server; h2c: http2.Http2Server; server: net.Server } {
  const http1 = http.createServer({ keepAliveTimeout: 65_000, maxHeaderSize: MAX_HEADER_BYTES }, handle);
  const h2c = http2.createServer({ maxSessionMemory: 64, settings: { maxHeaderListSize: MAX_HEADER_BYTES } }, handle);
  return { http1, h2c, server: createOnePortServer(http1, h2c) };
}

/**
 * One plain TCP port for HTTP/1.1 and HTTP/2 cleartext. Node's HTTP/2 server does not fall back to
 * HTTP/1.1 without TLS, so each connection's first bytes decide: the HTTP/2 preface goes to the h2c
 * server (gRPC, Connect over HTTP/2), anything else to the HTTP/1.1 server (Connect, gRPC-Web,
 * WebSocket upgrades, health and metrics).
 */
export function createOnePortServer(http1: http.Server, http2Server: http2.Http2Server): net.Server {
  return net.createServer({ noDelay: true }, (socket) => {
    let received = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      const compared = Math.min(received.length, HTTP2_PREFACE.length);
      const isHttp2 = received.subarray(0, compared).equals(HTTP2_PREFACE.subarray(0, compared));
      if (isHttp2 && received.length < HTTP2_PREFACE.length) return; // wait for the whole preface
      socket.off("data", onData);
      socket.pause();
      socket.unshift(received);
      // The HTTP/2 session reads the unshifted preface from the socket's buffer itself; the HTTP/1.1
      // parser needs the paused socket to flow again.
      if (isHttp2) {
        http2Server.emit("connection", socket);
      } else {
        http1.emit("connection", socket);
        socket.resume();
      }
    };
    socket.on("data", onData);
    socket.on("error", () => socket.destroy());
  });
}
