import type http from "node:http";
import type http2 from "node:http2";
import type { TokenVerifier } from "../auth/token-verifier.js";
import type { Logger } from "../observability/logger.js";
import type { ConnectionTokens } from "./connection-tokens.js";
import type { CorsPolicy } from "./cors.js";
import { authenticate } from "./upgrade-auth.js";

export const HUB_PATH = "/hubs/chat";

type Request = http.IncomingMessage | http2.Http2ServerRequest;
type Response = http.ServerResponse | http2.Http2ServerResponse;

export interface NegotiateDeps {
  cors: CorsPolicy;
  tokens: ConnectionTokens;
  verifier: TokenVerifier;
  log: Logger;
  closing: () => boolean;
}

const availableTransports = [{ transport: "WebSockets", transferFormats: ["Text"] }];

/**
 * HTTP requests to the hub: `POST /hubs/chat/negotiate` and CORS preflights. Returns false for
 * paths that are not the hub's. Negotiate needs a valid bearer token (401 otherwise), as SignalR
 * clients send it there too; the WebSocket request is authenticated again.
 */
export function createHttpHandler(deps: NegotiateDeps): (req: Request, res: Response) => boolean {
  return (req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    const negotiate = url.pathname === `${HUB_PATH}/negotiate`;
    if (!negotiate && url.pathname !== HUB_PATH && url.pathname !== `${HUB_PATH}/`) return false;
    if (req.method === "OPTIONS") {
      const headers = deps.cors.preflight(req);
      if (headers) send(res, 204, headers);
      else send(res, 403, {}, "origin not allowed\n");
      return true;
    }
    const cors = deps.cors.headers(req);
    if (!negotiate) {
      send(res, 400, cors, "the hub accepts WebSocket connections only (transport: WebSockets)\n");
    } else if (req.method !== "POST") {
      send(res, 405, { ...cors, allow: "POST, OPTIONS" }, "negotiate needs POST\n");
    } else if (deps.closing()) {
      send(res, 503, cors, "server shutting down\n");
    } else {
      void answerNegotiate(deps, req, res, url, cors);
    }
    return true;
  };
}

async function answerNegotiate(deps: NegotiateDeps, req: Request, res: Response, url: URL, cors: Record<string, string>) {
  const queryToken = url.searchParams.get("access_token");
  const caller = await authenticate(deps.verifier, req.headers.authorization, queryToken);
  if (caller instanceof Error) {
    // RFC 6750: no error code when the request carried no credentials at all.
    const sent = req.headers.authorization !== undefined || queryToken !== null;
    send(res, 401, { ...cors, "www-authenticate": sent ? 'Bearer error="invalid_token"' : "Bearer" }, `Unauthorized: ${caller.message}\n`);
    return;
  }
  const version = Number(url.searchParams.get("negotiateVersion") ?? "0");
  const { connectionId, connectionToken } = deps.tokens.issue();
  // Version 0 clients connect with ?id=<connectionId>, so the id field carries the token.
  const body = version >= 1
    ? { negotiateVersion: 1, connectionId, connectionToken, availableTransports }
    : { connectionId: connectionToken, availableTransports };
  deps.log.debug({ connectionId }, "hub negotiate");
  send(res, 200, { ...cors, "content-type": "application/json" }, JSON.stringify(body));
}

function send(res: Response, status: number, headers: Record<string, string>, body = ""): void {
  (res as http.ServerResponse).writeHead(status, {
    "cache-control": "no-store",
    ...(body && !headers["content-type"] ? { "content-type": "text/plain" } : {}),
    ...headers,
  });
  res.end(body);
}
