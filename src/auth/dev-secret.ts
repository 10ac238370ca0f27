import crypto from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";

/** Where development mode keeps its generated HS256 secret. */
export function devSecretPath(dataDir: string): string {
  return path.join(dataDir, "dev-jwt-secret");
}

/** Reads the development secret, creating it on first use. */
export async function loadDevSecret(dataDir: string): Promise<{ secret: string; created: boolean }> {
  const file = devSecretPath(dataDir);
  try {
    return { secret: (await fs.readFile(file, "utf8")).trim(), created: false };
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
  await fs.mkdir(dataDir, { recursive: true });
  const secret = crypto.randomBytes(32).toString("base64url");
  try {
    await fs.writeFile(file, secret + "\n", { mode: 0o600, flag: "wx" });
    return { secret, created: true };
  } catch (error) {
    // Another process created it first: use theirs.
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    return { secret: (await fs.readFile(file, "utf8")).trim(), created: false };
  }
}
