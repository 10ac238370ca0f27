import net from "node:net";
import path from "node:path";

/** Everything Parley reads from the environment, validated once at start-up. */
export interface Config {
  host: string;
  port: number;
  production: boolean;
  dataDir: string;
  /** postgres:// URL; undefined selects the embedded PGlite database in dataDir. */
  databaseUrl: string | undefined;
  /** Seconds a query may take before the RPC fails with UNAVAILABLE. */
  dbTimeoutSeconds: number;
  /** Comma-separated nats:// servers; undefined selects the in-process bus. */
  natsUrl: string | undefined;
  natsPrefix: string;
  jwt: {
    secret: string | undefined;
    jwksFile: string | undefined;
    issuer: string | undefined;
    audience: string | undefined;
  };
  reflection: boolean;
  sendRatePerSecond: number;
  sendBurst: number;
  maxMembers: number;
  /** Concurrent Subscribe/WatchMessages/hub streams per user and instance. */
  maxStreamsPerUser: number;
  heartbeatSeconds: number;
  /** Events a stream may fall behind before it is closed (Subscribe, hub) or resynchronised (WatchMessages). */
  streamQueueLimit: number;
  maxRequestBytes: number;
  shutdownTimeoutSeconds: number;
  logLevel: string;
  hub: {
    /** Seconds between the hub's pings to a client. */
    keepAliveSeconds: number;
    /** Seconds without any message from a client before the hub closes the connection. */
    timeoutSeconds: number;
    /** Largest WebSocket message the hub accepts. */
    maxMessageBytes: number;
  };
  /** Origins allowed for CORS on the RPCs (Connect, gRPC-Web), the hub's negotiate request and WebSocket ("*" = any). */
  corsOrigins: string[];
  demo: {
    /** PARLEY_DEMO: serve the demo page at / (default on, off with NODE_ENV=production). */
    enabled: boolean;
    /**
     * POST /demo/token (tokens for any tenant and user): only with the demo on AND development mode
     * (no key configured, NODE_ENV not production). No variable can turn it on otherwise.
     */
    devTokens: boolean;
  };
}

export class ConfigError extends Error {}

type Env = Record<string, string | undefined>;

export function loadConfig(env: Env = process.env): Config {
  const production = env.NODE_ENV === "production";
  const databaseUrl = optional(env, "DATABASE_URL");
  if (databaseUrl !== undefined && !/^postgres(ql)?:\/\/[^\s]+$/.test(databaseUrl)) {
    throw new ConfigError("DATABASE_URL must be a postgres:// or postgresql:// URL");
  }
  if (databaseUrl !== undefined) {
    try {
      new URL(databaseUrl);
    } catch {
      throw new ConfigError("DATABASE_URL is not a valid URL");
    }
  }
  const natsUrl = optional(env, "NATS_URL");
  if (natsUrl !== undefined) {
    for (const server of natsUrl.split(",")) {
      if (!/^(nats|tls|ws|wss):\/\/[^\s,]+$/.test(server.trim()) && !/^[^\s:/,]+:\d+$/.test(server.trim())) {
        throw new ConfigError(`NATS_URL has an invalid server "${server.trim()}" (expected nats://host:port)`);
      }
    }
  }
  const natsPrefix = optional(env, "PARLEY_NATS_PREFIX") ?? "parley";
  if (!/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(natsPrefix)) {
    throw new ConfigError("PARLEY_NATS_PREFIX must be dot-separated tokens of letters, digits, '_' or '-'");
  }
  const secret = optional(env, "PARLEY_JWT_SECRET");
  const jwksFile = optional(env, "PARLEY_JWKS_FILE");
  if (secret !== undefined && jwksFile !== undefined) {
    throw new ConfigError("set only one of PARLEY_JWT_SECRET and PARLEY_JWKS_FILE");
  }
  if (secret !== undefined && Buffer.byteLength(secret) < 32) {
    throw new ConfigError("PARLEY_JWT_SECRET must be at least 32 bytes for HS256");
  }
  if (production && secret === undefined && jwksFile === undefined) {
    throw new ConfigError("NODE_ENV=production needs PARLEY_JWT_SECRET or PARLEY_JWKS_FILE");
  }
  const reflection = optional(env, "PARLEY_REFLECTION") ?? "on";
  if (reflection !== "on" && reflection !== "off") {
    throw new ConfigError("PARLEY_REFLECTION must be on or off");
  }
  const logLevel = optional(env, "PARLEY_LOG_LEVEL") ?? "info";
  if (!["fatal", "error", "warn", "info", "debug", "trace", "silent"].includes(logLevel)) {
    throw new ConfigError("PARLEY_LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent");
  }
  const corsOrigins = origins(optional(env, "PARLEY_CORS_ORIGINS") ?? (production ? "" : "*"));
  const demo = optional(env, "PARLEY_DEMO") ?? (production ? "off" : "on");
  if (demo !== "on" && demo !== "off") {
    throw new ConfigError("PARLEY_DEMO must be on or off");
  }
  const developmentMode = !production && secret === undefined && jwksFile === undefined;
  return {
    host: host(optional(env, "PARLEY_HOST") ?? "0.0.0.0"),
    port: integer(env, "PARLEY_PORT", 8080, 0, 65535),
    production,
    dataDir: path.resolve(optional(env, "PARLEY_DATA_DIR") ?? "./data"),
    databaseUrl,
    dbTimeoutSeconds: number(env, "PARLEY_DB_TIMEOUT_SECONDS", 5, 0.1, 600),
    natsUrl,
    natsPrefix,
    jwt: {
      secret,
      jwksFile: jwksFile === undefined ? undefined : path.resolve(jwksFile),
      issuer: optional(env, "PARLEY_JWT_ISSUER"),
      audience: optional(env, "PARLEY_JWT_AUDIENCE"),
    },
    reflection: reflection === "on",
    sendRatePerSecond: number(env, "PARLEY_SEND_RATE", 20, 0.001, 1_000_000),
    sendBurst: integer(env, "PARLEY_SEND_BURST", 40, 1, 1_000_000),
    maxMembers: integer(env, "PARLEY_MAX_MEMBERS", 10_000, 1, 10_000_000),
    maxStreamsPerUser: integer(env, "PARLEY_MAX_STREAMS_PER_USER", 100, 1, 1_000_000),
    heartbeatSeconds: number(env, "PARLEY_HEARTBEAT_SECONDS", 25, 0.05, 3600),
    streamQueueLimit: integer(env, "PARLEY_STREAM_QUEUE_LIMIT", 1000, 1, 1_000_000),
    maxRequestBytes: integer(env, "PARLEY_MAX_REQUEST_BYTES", 1024 * 1024, 1024, 64 * 1024 * 1024),
    shutdownTimeoutSeconds: number(env, "PARLEY_SHUTDOWN_TIMEOUT_SECONDS", 10, 0, 600),
    logLevel,
    hub: {
      keepAliveSeconds: number(env, "PARLEY_HUB_KEEPALIVE_SECONDS", 15, 0.05, 3600),
      timeoutSeconds: number(env, "PARLEY_HUB_TIMEOUT_SECONDS", 30, 0.1, 3600),
      maxMessageBytes: integer(env, "PARLEY_HUB_MAX_MESSAGE_BYTES", 64 * 1024, 1024, 16 * 1024 * 1024),
    },
    corsOrigins,
    demo: { enabled: demo === "on", devTokens: demo === "on" && developmentMode },
  };
}

/** PARLEY_CORS_ORIGINS: "*" or comma-separated origins such as https://app.example.com, normalised as browsers send them. */
function origins(raw: string): string[] {
  return raw.split(",").map((o) => o.trim()).filter((o) => o !== "").map((origin) => {
    if (origin === "*") return origin;
    let url: URL | undefined;
    try {
      url = new URL(origin);
    } catch {
      url = undefined;
    }
    const bare = url && url.pathname === "/" && url.search === "" && url.hash === "" && url.username === "";
    if (!url || url.origin === "null" || !bare) {
      throw new ConfigError(`PARLEY_CORS_ORIGINS has an invalid origin "${origin}" (expected * or scheme://host[:port])`);
    }
    return url.origin;
  });
}

/**
 * An IP address (IPv6 with or without brackets) or a host name (letters, digits, "-" and "_", as
 * container names have them, with an optional final dot); whether it resolves to a local address
 * shows when Parley listens.
 */
function host(value: string): string {
  const unbracketed = /^\[(.*)\]$/.exec(value)?.[1];
  if (unbracketed !== undefined && net.isIPv6(unbracketed)) return unbracketed;
  const label = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";
  const hostName = new RegExp(`^(?=.{1,254}$)${label}(\\.${label})*\\.?$`);
  const looksNumeric = /^[\d.]+$/.test(value);
  if (net.isIP(value) || (!looksNumeric && hostName.test(value))) return value;
  throw new ConfigError(`PARLEY_HOST is not an IP address or host name: "${value}"`);
}

function optional(env: Env, name: string): string | undefined {
  const value = env[name]?.trim();
  return value === undefined || value === "" ? undefined : value;
}

function number(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = optional(env, name);
  if (raw === undefined) return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max) {
    throw new ConfigError(`${name} must be a number from ${min} to ${max}, got "${raw}"`);
  }
  return value;
}

function integer(env: Env, name: string, fallback: number, min: number, max: number): number {
  const value = number(env, name, fallback, min, max);
  if (!Number.isInteger(value)) throw new ConfigError(`${name} must be a whole number, got "${env[name]}"`);
  return value;
}
