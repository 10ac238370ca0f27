import { SignJWT } from "jose";
import { loadDevSecret } from "../auth/dev-secret.js";
import { isValidTenantId, isValidUserId, TENANT_ID_RULE, USER_ID_RULE } from "../auth/token-verifier.js";
import type { Config } from "../config.js";

const TTL_SECONDS = 12 * 3600;

export class DevTokenError extends Error {}

/**
 * Tokens for any tenant and user, signed with the development secret, for the demo's sign-in.
 * Exists only in development mode: config.demo.devTokens is false whenever a key is configured or
 * NODE_ENV is production, and this refuses to be built then, whatever the config says.
 */
export class DevTokens {
  private constructor(private readonly secret: Uint8Array, private readonly config: Config) {}

  static async create(config: Config): Promise<DevTokens> {
    if (!config.demo.devTokens || config.production || config.jwt.secret !== undefined || config.jwt.jwksFile !== undefined) {
      throw new Error("development tokens exist only in development mode with the demo on");
    }
    const { secret } = await loadDevSecret(config.dataDir);
    return new DevTokens(new TextEncoder().encode(secret), config);
  }

  async issue(tenant: unknown, user: unknown): Promise<{ token: string; expiresInSeconds: number }> {
    if (typeof tenant !== "string" || !isValidTenantId(tenant)) {
      throw new DevTokenError(`tenant ${TENANT_ID_RULE}`);
    }
    if (typeof user !== "string" || !isValidUserId(user)) {
      throw new DevTokenError(`user ${USER_ID_RULE}`);
    }
    let jwt = new SignJWT({ tid: tenant })
      .setProtectedHeader({ alg: "HS256", typ: "JWT" })
      .setSubject(user)
      .setIssuedAt()
      .setExpirationTime(`${TTL_SECONDS}s`);
    if (this.config.jwt.issuer) jwt = jwt.setIssuer(this.config.jwt.issuer);
    if (this.config.jwt.audience) jwt = jwt.setAudience(this.config.jwt.audience);
    return { token: await jwt.sign(this.secret), expiresInSeconds: TTL_SECONDS };
  }
}
