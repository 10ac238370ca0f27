import fs from "node:fs/promises";
import { createLocalJWKSet, errors, jwtVerify, type JWTVerifyGetKey } from "jose";
import type { Config } from "../config.js";
import { ConfigError } from "../config.js";
import { UnauthenticatedError } from "../errors.js";
import type { Logger } from "../observability/logger.js";
import type { Caller } from "./caller.js";
import { loadDevSecret } from "./dev-secret.js";

const TENANT_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/;
/** Control characters (C0, DEL, C1): not allowed in user ids and client message ids. */
export const CONTROL_CHARACTER = /[\u0000-\u001f\u007f-\u009f]/;
/** Far above any real token; refuses to spend CPU on huge inputs. */
const MAX_TOKEN_LENGTH = 8192;
/** Verified tokens are remembered (until they expire, at most this long): clients send the same token on every call. */
const CACHE_MS = 5 * 60_000;
const CACHE_ENTRIES = 10_000;

/** What a tenant id and a user id must be, for messages wherever one is refused. */
export const TENANT_ID_RULE = `must match ${TENANT_PATTERN.source}`;
export const USER_ID_RULE = "must be 1 to 128 characters without control characters";

export function isValidTenantId(id: string): boolean {
  return TENANT_PATTERN.test(id);
}

export function isValidUserId(id: string): boolean {
  const length = [...id].length;
  return length >= 1 && length <= 128 && !CONTROL_CHARACTER.test(id);
}

interface Jwk {
  kty?: unknown;
  crv?: unknown;
  alg?: unknown;
  kid?: unknown;
  use?: unknown;
  key_ops?: unknown;
  n?: unknown;
  d?: unknown;
}

/** The algorithm a JWK verifies for Parley (as jose selects keys), or undefined when it cannot. */
function algorithmOf(key: Jwk): string | undefined {
  if (key.use !== undefined && key.use !== "sig") return undefined;
  if (key.key_ops !== undefined && !(Array.isArray(key.key_ops) && key.key_ops.includes("verify"))) return undefined;
  const alg = key.kty === "RSA" && typeof key.n === "string" && key.n.length * 6 >= 2040 ? "RS256"
    : key.kty === "EC" && key.crv === "P-256" ? "ES256"
    : key.kty === "OKP" && key.crv === "Ed25519" ? "EdDSA"
    : undefined;
  return key.alg === undefined || key.alg === alg ? alg : undefined;
}

/**
 * A JWKS from an identity provider may hold keys for other uses, which are ignored; but a file with no
 * key Parley can verify with would refuse every token, a private key does not belong in it, and two
 * keys for one algorithm under one kid make the choice ambiguous: these stop the start-up instead.
 */
function checkUsableKeys(keys: unknown[]): void {
  if (!keys.every((key) => typeof key === "object" && key !== null)) throw new ConfigError("PARLEY_JWKS_FILE keys must be JSON objects");
  if ((keys as Jwk[]).some((key) => key.d !== undefined)) {
    throw new ConfigError("PARLEY_JWKS_FILE holds a private key: publish only the public keys");
  }
  const usable = (keys as Jwk[]).map((key) => ({ kid: key.kid, alg: algorithmOf(key) })).filter((key) => key.alg !== undefined);
  if (usable.length === 0) {
    throw new ConfigError("PARLEY_JWKS_FILE has no signing key Parley can use (RS256 with 2048 bits or more, ES256, EdDSA with Ed25519)");
  }
  const seen = new Set<string>();
  for (const { kid, alg } of usable) {
    if (kid === undefined) continue;
    const name = `${alg} key with kid ${JSON.stringify(kid)}`;
    if (seen.has(name)) throw new ConfigError(`PARLEY_JWKS_FILE has more than one ${name}`);
    seen.add(name);
  }
}

/** Verifies bearer tokens: HS256 with a secret, or RS256/ES256/EdDSA with a JWKS file. */
export class TokenVerifier {
  private readonly verified = new Map<string, { caller: Caller; untilMs: number }>();

  private constructor(
    private readonly key: Uint8Array | JWTVerifyGetKey,
    private readonly algorithms: string[],
    private readonly issuer: string | undefined,
    private readonly audience: string | undefined,
  ) {}

  static async create(config: Config, log: Logger): Promise<TokenVerifier> {
    const { issuer, audience } = config.jwt;
    if (config.jwt.jwksFile !== undefined) {
      let jwks;
      try {
        jwks = JSON.parse(await fs.readFile(config.jwt.jwksFile, "utf8"));
      } catch (error) {
        throw new ConfigError(`PARLEY_JWKS_FILE cannot be read as JSON: ${(error as Error).message}`);
      }
      if (!Array.isArray(jwks?.keys)) throw new ConfigError("PARLEY_JWKS_FILE must hold a JWKS: {\"keys\": [...]}");
      checkUsableKeys(jwks.keys);
      return new TokenVerifier(createLocalJWKSet(jwks), ["RS256", "ES256", "EdDSA"], issuer, audience);
    }
    let secret = config.jwt.secret;
    if (secret === undefined) {
      const dev = await loadDevSecret(config.dataDir);
      secret = dev.secret;
      log.warn(
        { dataDir: config.dataDir, created: dev.created },
        "development mode: tokens are signed with a generated secret in the data directory; " +
          "get one with `npm run token -- --tenant T --user U`",
      );
    }
    return new TokenVerifier(new TextEncoder().encode(secret), ["HS256"], issuer, audience);
  }

  /** Verifies an `authorization` header value ("Bearer <jwt>") and returns the caller it names. */
  async verifyHeader(header: string | null | undefined): Promise<Caller> {
    const match = /^Bearer +(\S+)\s*$/i.exec(header ?? "");
    if (!match) throw new UnauthenticatedError("missing bearer token (send the authorization header as Bearer <JWT>)");
    return this.verify(match[1]!);
  }

  async verify(token: string): Promise<Caller> {
    if (token.length > MAX_TOKEN_LENGTH) throw new UnauthenticatedError("token too long");
    const cached = this.verified.get(token);
    if (cached && cached.untilMs > Date.now()) return cached.caller;
    const { caller, expiresAtMs } = await this.verifyUncached(token);
    if (this.verified.size >= CACHE_ENTRIES) this.verified.delete(this.verified.keys().next().value!);
    this.verified.set(token, { caller, untilMs: Math.min(expiresAtMs, Date.now() + CACHE_MS) });
    return caller;
  }

  private async verifyUncached(token: string): Promise<{ caller: Caller; expiresAtMs: number }> {
    let payload;
    try {
      ({ payload } = await jwtVerify(token, this.key as Uint8Array, {
        algorithms: this.algorithms,
        issuer: this.issuer,
        audience: this.audience,
      }));
    } catch (error) {
      throw new UnauthenticatedError(error instanceof errors.JWTExpired ? "token expired" : "invalid token");
    }
    const { sub, tid } = payload as { sub?: unknown; tid?: unknown };
    if (typeof tid !== "string" || !isValidTenantId(tid)) throw new UnauthenticatedError("invalid tid claim");
    if (typeof sub !== "string" || !isValidUserId(sub)) throw new UnauthenticatedError("invalid sub claim");
    const expiresAtMs = typeof payload.exp === "number" ? payload.exp * 1000 : Infinity;
    return { caller: { tenantId: tid, userId: sub }, expiresAtMs };
  }
}
