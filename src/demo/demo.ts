import crypto from "node:crypto";
import type http from "node:http";
import type http2 from "node:http2";
import type { Config } from "../config.js";
import type { Logger } from "../observability/logger.js";
import { DevTokenError, DevTokens } from "./dev-tokens.js";

type Request = http.IncomingMessage | http2.Http2ServerRequest;
type Response = http.ServerResponse | http2.Http2ServerResponse;

interface Asset {
  contentType: string;
  body: Buffer;
  etag: string;
}

const MAX_TOKEN_REQUEST_BYTES = 4096;

/** Same-origin only: the page talks to this server and nothing else. */
const PAGE_HEADERS = {
  "content-security-policy":
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
};

export interface Demo {
  /** Serves the demo's paths; false for any other path. */
  handle(path: string, req: Request, res: Response): Promise<boolean>;
}

/**
 * The demo page (PARLEY_DEMO): `/` and `/demo/*`, bundled from web/demo with esbuild on the first
 * request and kept in memory. `GET /demo/config.json` tells the page whether `POST /demo/token`
 * exists, which it does only in development mode (see DevTokens).
 */
export async function createDemo(config: Config, log: Logger): Promise<Demo> {
  const devTokens = config.demo.devTokens ? await DevTokens.create(config) : undefined;
  if (devTokens) {
    log.warn("demo page: POST /demo/token signs in as any tenant and user (development mode only)");
  }
  let assets: Promise<Map<string, Asset>> | undefined;
  const load = () => {
    // The bundler is loaded only when the demo is first used, and production never needs it.
    assets ??= import("../../web/build.js").then(async ({ buildDemo }) => {
      const built = new Map<string, Asset>();
      for (const [path, asset] of await buildDemo()) {
        const etag = `"${crypto.createHash("sha256").update(asset.body).digest("base64url").slice(0, 22)}"`;
        built.set(path, { ...asset, etag });
      }
      return built;
    });
    assets.catch(() => (assets = undefined)); // a failed build is retried on the next request
    return assets;
  };
  const pageConfig = JSON.stringify({ devTokens: devTokens !== undefined });

  const route = async (path: string, req: Request, res: Response): Promise<boolean> => {
    if (path === "/demo/token" && devTokens) {
      if (req.method !== "POST") return send(res, 405, { allow: "POST" }, "use POST\n");
      await issueToken(devTokens, req, res);
      return true;
    }
    if (path === "/demo/config.json") {
      if (req.method !== "GET" && req.method !== "HEAD") return send(res, 405, { allow: "GET, HEAD" }, "use GET\n");
      return send(res, 200, { "content-type": "application/json" }, pageConfig, req.method === "HEAD");
    }
    if (path !== "/" && !path.startsWith("/demo/")) return false;
    let files: Map<string, Asset>;
    try {
      files = await load();
    } catch (error) {
      log.error({ err: error }, "demo page: building web/demo failed");
      return send(res, 500, {}, "the demo page could not be built (see the server log)\n");
    }
    const asset = files.get(path);
    if (!asset) return false;
    if (req.method !== "GET" && req.method !== "HEAD") return send(res, 405, { allow: "GET, HEAD" }, "use GET\n");
    const headers = { "content-type": asset.contentType, etag: asset.etag, "cache-control": "no-cache", ...PAGE_HEADERS };
    if (req.headers["if-none-match"] === asset.etag) return send(res, 304, headers, "", true);
    return send(res, 200, headers, asset.body, req.method === "HEAD");
  };

  return {
    async handle(path, req, res) {
      try {
        return await route(path, req, res);
      } catch (error) {
        log.warn({ err: error, path }, "demo page: request failed");
        if (!res.headersSent) send(res, 500, {}, "internal error\n");
        else res.end();
        return true;
      }
    },
  };
}

async function issueToken(devTokens: DevTokens, req: Request, res: Response): Promise<void> {
  // JSON only: a cross-site form cannot send it without a preflight, and no CORS headers are sent.
  if (!/^application\/json\b/i.test(req.headers["content-type"] ?? "")) {
    send(res, 415, {}, "content-type must be application/json\n");
    return;
  }
  let body: { tenant?: unknown; user?: unknown };
  try {
    body = JSON.parse(await readBody(req, MAX_TOKEN_REQUEST_BYTES)) ?? {};
  } catch (error) {
    send(res, 400, {}, `${(error as Error).message === "too large" ? "request too large" : "body must be JSON {\"tenant\", \"user\"}"}\n`);
    return;
  }
  try {
    const issued = await devTokens.issue(body.tenant, body.user);
    send(res, 200, { "content-type": "application/json" }, JSON.stringify(issued));
  } catch (error) {
    if (error instanceof DevTokenError) send(res, 400, {}, `${error.message}\n`);
    else send(res, 500, {}, "could not issue a token\n");
  }
}

function readBody(req: Request, limit: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        req.removeAllListeners("data");
        req.resume();
        reject(new Error("too large"));
      } else {
        chunks.push(chunk);
      }
    });
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

function send(res: Response, status: number, headers: Record<string, string>, body: string | Buffer, headOnly = false): true {
  (res as http.ServerResponse).writeHead(status, {
    "cache-control": "no-store",
    ...(body && !headers["content-type"] ? { "content-type": "text/plain; charset=utf-8" } : {}),
    ...headers,
  });
  if (headOnly) res.end();
  else res.end(body);
  return true;
}
