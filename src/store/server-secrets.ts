import crypto from "node:crypto";
import type { Sql } from "./database.js";

/** A random secret shared by every instance on the same database, created by whichever asks first. */
export async function loadServerSecret(sql: Sql, name: string): Promise<Buffer> {
  await sql`INSERT INTO server_secrets (name, value) VALUES (${name}, ${crypto.randomBytes(32)})
            ON CONFLICT (name) DO NOTHING`;
  const [row] = await sql`SELECT value FROM server_secrets WHERE name = ${name}`;
  return row!.value as Buffer;
}
