import fs from "node:fs/promises";
import type postgres from "postgres";
import type { Logger } from "../observability/logger.js";

const migrationsDir = new URL("./migrations/", import.meta.url);
/** Arbitrary constant: serialises migrations of instances that start at the same moment. */
const MIGRATION_LOCK = 7_283_114_001;

/** Applies every migrations/NNN_name.sql not yet recorded, in order, each in its own transaction. */
export async function migrate(sql: postgres.Sql, log: Logger): Promise<void> {
  const files = (await fs.readdir(migrationsDir)).filter((f) => /^\d{3}_.+\.sql$/.test(f)).sort();
  await sql.begin(async (tx) => {
    await tx`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK})`;
    await tx`CREATE TABLE IF NOT EXISTS schema_migrations (
      version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`;
    const applied = new Set((await tx`SELECT version FROM schema_migrations`).map((r) => r.version as number));
    for (const file of files) {
      const version = Number(file.slice(0, 3));
      if (applied.has(version)) continue;
      await tx.unsafe(await fs.readFile(new URL(file, migrationsDir), "utf8"));
      await tx`INSERT INTO schema_migrations (version, name) VALUES (${version}, ${file})`;
      log.info({ migration: file }, "migration applied");
    }
  });
}
