import type http from "node:http";
import type { Duplex } from "node:stream";

/** Headers that only mean something to the upgrade being declined. */
const UPGRADE_HEADERS = new Set(["upgrade", "http2-settings"]);

/**
 * Serves an upgrade request the hub does not take (`Upgrade: h2c`, as `curl --http2` sends) as the
 * plain HTTP/1.1 request it also is; RFC 9110 lets a server ignore Upgrade. Node hands such requests
 * to the 'upgrade' listener once one exists, so the request is written back in front of its body and
 * the socket given to the HTTP/1.1 server again.
 */
export function serveAsPlainRequest(http1: http.Server, req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
  let text = `${req.method} ${req.url} HTTP/${req.httpVersion}\r\n`;
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i]!;
    let value = req.rawHeaders[i + 1]!;
    const lower = name.toLowerCase();
    if (UPGRADE_HEADERS.has(lower)) continue;
    if (lower === "connection") {
      const tokens = value.split(",").map((t) => t.trim());
      value = tokens.filter((t) => !UPGRADE_HEADERS.has(t.toLowerCase())).join(", ");
      if (value === "") continue;
    }
    text += `${name}: ${value}\r\n`;
  }
  socket.unshift(Buffer.concat([Buffer.from(text + "\r\n", "latin1"), head]));
  http1.emit("connection", socket);
}
