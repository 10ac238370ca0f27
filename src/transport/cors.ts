import type http from "node:http";
import type http2 from "node:http2";
import { cors } from "@connectrpc/connect";
import type { CorsPolicy } from "../hub/cors.js";

type Request = http.IncomingMessage | http2.Http2ServerRequest;
type Response = http.ServerResponse | http2.Http2ServerResponse;

/** What browser clients must be able to read: gRPC-Web status headers, and the request id. */
const EXPOSED_HEADERS = [...cors.exposedHeaders, "x-request-id"].join(", ");

/**
 * CORS for the RPC paths (Connect and gRPC-Web from browser apps on other origins), with the same
 * PARLEY_CORS_ORIGINS policy as the hub. Answers preflights itself (true) and adds the CORS headers
 * to every other response from an allowed origin (false: the RPC still has to be served).
 */
export function rpcCors(policy: CorsPolicy): (req: Request, res: Response) => boolean {
  return (req, res) => {
    if (req.method === "OPTIONS") {
      const headers = policy.preflight(req);
      (res as http.ServerResponse).writeHead(headers ? 204 : 403, { "cache-control": "no-store", ...headers });
      res.end();
      return true;
    }
    const headers = policy.headers(req);
    if (headers["access-control-allow-origin"] === undefined) return false;
    for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
    res.setHeader("access-control-expose-headers", EXPOSED_HEADERS);
    return false;
  };
}
