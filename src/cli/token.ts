// Prints a development token: npm run token -- --tenant T --user U [--ttl SECONDS]
import { parseArgs } from "node:util";
import { SignJWT } from "jose";
import { ConfigError, loadConfig } from "../config.js";
import { loadDevSecret } from "../auth/dev-secret.js";
import { isValidTenantId, isValidUserId, TENANT_ID_RULE, USER_ID_RULE } from "../auth/token-verifier.js";

try {
  const { values } = parseArgs({
    options: { tenant: { type: "string" }, user: { type: "string" }, ttl: { type: "string", default: "86400" } },
  });
  if (!values.tenant || !values.user) throw new ConfigError("usage: npm run token -- --tenant T --user U [--ttl SECONDS]");
  // The server would refuse a token with these claims.
  if (!isValidTenantId(values.tenant)) throw new ConfigError(`--tenant ${TENANT_ID_RULE}`);
  if (!isValidUserId(values.user)) throw new ConfigError(`--user ${USER_ID_RULE}`);
  const ttl = Number(values.ttl);
  if (!Number.isInteger(ttl) || ttl <= 0) throw new ConfigError("--ttl must be a positive number of seconds");
  const config = loadConfig();
  if (config.jwt.jwksFile !== undefined) {
    throw new ConfigError("PARLEY_JWKS_FILE is set: tokens come from your identity provider, not from this command");
  }
  const secret = config.jwt.secret ?? (await loadDevSecret(config.dataDir)).secret;
  let jwt = new SignJWT({ tid: values.tenant })
    .setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .setSubject(values.user)
    .setIssuedAt()
    .setExpirationTime(`${ttl}s`);
  if (config.jwt.issuer) jwt = jwt.setIssuer(config.jwt.issuer);
  if (config.jwt.audience) jwt = jwt.setAudience(config.jwt.audience);
  console.log(await jwt.sign(new TextEncoder().encode(secret)));
} catch (error) {
  console.error(`token: ${(error as Error).message}`);
  process.exit(2);
}
