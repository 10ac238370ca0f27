import type http from "node:http";
import type http2 from "node:http2";

type Request = http.IncomingMessage | http2.Http2ServerRequest;

/**
 * CORS for the hub's HTTP endpoints, from PARLEY_CORS_ORIGINS. Browsers' SignalR clients send
 * negotiate with credentials, so an allowed origin is echoed (never "*") with
 * Access-Control-Allow-Credentials; Parley authenticates with bearer tokens, not cookies.
 */
export class CorsPolicy {
  private readonly any: boolean;
  private readonly origins: Set<string>;

  constructor(origins: string[]) {
    this.any = origins.includes("*");
    this.origins = new Set(origins);
  }

  /** Requests without an Origin header (non-browser clients) are always allowed. */
  allows(origin: string | undefined): boolean {
    return origin === undefined || this.any || this.origins.has(origin);
  }

  /** Headers for the response to an (allowed) cross-origin request. */
  headers(req: Request): Record<string, string> {
    const origin = originOf(req);
    if (origin === undefined || !this.allows(origin)) return {};
    return { "access-control-allow-origin": origin, "access-control-allow-credentials": "true", vary: "Origin" };
  }

  /** Headers answering a preflight, or undefined when the origin is not allowed. */
  preflight(req: Request): Record<string, string> | undefined {
    const origin = originOf(req);
    if (origin === undefined || !this.allows(origin)) return undefined;
    const requested = header(req, "access-control-request-headers");
    return {
      ...this.headers(req),
      "access-control-allow-methods": "POST, GET, OPTIONS",
      ...(requested && /^[\w\s,-]{1,1000}$/.test(requested) ? { "access-control-allow-headers": requested } : {}),
      "access-control-max-age": "600",
      vary: "Origin, Access-Control-Request-Headers",
    };
  }
}

export function originOf(req: Request): string | undefined {
  return header(req, "origin");
}

function header(req: Request, name: string): string | undefined {
  const value = req.headers[name];
  return typeof value === "string" ? value : undefined;
}
