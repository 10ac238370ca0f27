import crypto from "node:crypto";
import type http from "node:http";
import type http2 from "node:http2";
import type { Duplex } from "node:stream";
import { WebSocketServer } from "ws";
import type { TokenVerifier } from "../auth/token-verifier.js";
import type { Config } from "../config.js";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";
import { HubConnection } from "./connection.js";
import { ConnectionTokens } from "./connection-tokens.js";
import { CorsPolicy, originOf } from "./cors.js";
import { HubSocket } from "./hub-socket.js";
import type { HubServices } from "./methods.js";
import { createHttpHandler, HUB_PATH } from "./negotiate.js";
import { serveAsPlainRequest } from "./plain-request.js";
import { authenticate } from "./upgrade-auth.js";

/** How long a negotiated connection token may wait for its WebSocket. */
const CONNECTION_TOKEN_TTL_MS = 30_000;

export interface HubDeps {
  http1: http.Server;
  verifier: TokenVerifier;
  services: HubServices;
  config: Config;
  log: Logger;
  metrics: Metrics;
  /** Signs negotiate's connection tokens; shared by every instance so the WebSocket may reach any of them. */
  secret: Uint8Array;
}

export interface Hub {
  /** Answers negotiate and CORS preflights; false when the request is not for the hub. */
  handleHttp(
    req: http.IncomingMessage | http2.Http2ServerRequest,
    res: http.ServerResponse | http2.Http2ServerResponse,
  ): boolean;
  /** Refuses new connections, lets running invocations finish, then closes every connection with allowReconnect. */
  close(): Promise<void>;
}

/** The SignalR-compatible hub at /hubs/chat: WebSocket upgrades on the HTTP/1.1 server, negotiate over HTTP. */
export function createHub({ http1, verifier, services, config, log, metrics, secret }: HubDeps): Hub {
  const cors = new CorsPolicy(config.corsOrigins);
  const tokens = new ConnectionTokens(secret, CONNECTION_TOKEN_TTL_MS);
  const wss = new WebSocketServer({ noServer: true, maxPayload: config.hub.maxMessageBytes, WebSocket: HubSocket });
  const settings = {
    keepAliveMs: config.hub.keepAliveSeconds * 1000,
    timeoutMs: config.hub.timeoutSeconds * 1000,
    maxMessageBytes: config.hub.maxMessageBytes,
  };
  const connections = new Set<HubConnection>();
  let closing = false;

  const upgrade = async (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    if (req.headers.upgrade?.toLowerCase() !== "websocket") return serveAsPlainRequest(http1, req, socket, head);
    socket.on("error", () => socket.destroy());
    const url = new URL(req.url ?? "/", "http://localhost");
    if (url.pathname !== HUB_PATH && url.pathname !== `${HUB_PATH}/`) return reject(socket, 404, "Not Found");
    if (closing) return reject(socket, 503, "Service Unavailable");
    // Browsers send Origin on WebSockets too; CORS does not apply to them, so the hub checks it itself.
    if (!cors.allows(originOf(req))) return reject(socket, 403, "Forbidden");
    const token = url.searchParams.get("id");
    // Negotiated tokens are single-use and short-lived; like ASP.NET, an unknown one gets 404 and the
    // client negotiates again.
    const connectionId = token === null ? crypto.randomBytes(16).toString("base64url") : tokens.redeem(token);
    if (connectionId === undefined) return reject(socket, 404, "Not Found", "No Connection with that ID");
    const caller = await authenticate(verifier, req.headers.authorization, url.searchParams.get("access_token"));
    if (socket.destroyed) return;
    if (closing) return reject(socket, 503, "Service Unavailable");
    wss.handleUpgrade(req, socket, head, (ws) => {
      const connection = new HubConnection(ws as HubSocket, connectionId, caller, { services, log, settings });
      connections.add(connection);
      metrics.activeStreams.inc({ kind: "hub" });
      void connection.closed.then(() => {
        connections.delete(connection);
        metrics.activeStreams.dec({ kind: "hub" });
      });
    });
  };
  http1.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    upgrade(req, socket, head).catch((error) => {
      log.error({ err: error }, "hub upgrade failed");
      socket.destroy();
    });
  });

  let closed: Promise<void> | undefined;
  return {
    handleHttp: createHttpHandler({ cors, tokens, verifier, log, closing: () => closing }),
    close() {
      closing = true;
      closed ??= (async () => {
        await Promise.all([...connections].map((c) => c.shutdown()));
        await new Promise<void>((resolve) => wss.close(() => resolve()));
      })();
      return closed;
    },
  };
}

/** Answers an upgrade request with a plain HTTP error and closes the socket. */
function reject(socket: Duplex, status: number, statusText: string, body = `${statusText}\n`): void {
  if (socket.destroyed) return;
  socket.end(
    `HTTP/1.1 ${status} ${statusText}\r\nConnection: close\r\nContent-Type: text/plain\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
  socket.once("finish", () => socket.destroy());
}
