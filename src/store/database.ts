import fs from "node:fs/promises";
import path from "node:path";
import postgres from "postgres";
import type { Config } from "../config.js";
import type { Logger } from "../observability/logger.js";
import { withDeadline } from "../deadline.js";
import { migrate } from "./migrate.js";

export type Sql = postgres.Sql;

/** The one PostgreSQL connection pool of the process, real or embedded. */
export interface Database {
  sql: Sql;
  cancellable: Cancellable;
  /** Throws when the database cannot answer. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

export async function openDatabase(config: Config, log: Logger): Promise<Database> {
  const embedded = config.databaseUrl === undefined ? await startEmbedded(config.dataDir, log) : undefined;
  const url = embedded?.url ?? config.databaseUrl!;
  const sql = postgres(url, {
    // PGlite is single-connection: one pooled connection, queries queue in the client.
    max: embedded ? 1 : 20,
    // Booting PGlite blocks this process's event loop for seconds: give the first connection time.
    connect_timeout: embedded ? Math.max(60, config.dbTimeoutSeconds) : Math.max(1, Math.ceil(config.dbTimeoutSeconds)),
    idle_timeout: embedded ? 0 : 60,
    onnotice: () => {},
    // int64 columns (sequences) arrive as BigInt, the type protobuf-es uses for int64 fields.
    types: { bigint: postgres.BigInt },
    connection: {
      application_name: "parley",
      statement_timeout: Math.round(config.dbTimeoutSeconds * 1000),
    },
  });
  try {
    await migrate(sql, log);
  } catch (error) {
    await sql.end({ timeout: 1 });
    await embedded?.stop();
    throw error;
  }
  return {
    sql,
    cancellable: cancellableQueries(!embedded),
    async ping() {
      // A frozen server keeps connections open but silent: do not wait longer than any query may take.
      await withDeadline(sql`SELECT 1`.execute(), config.dbTimeoutSeconds * 1000, "database ping");
    },
    async close() {
      await sql.end({ timeout: 5 });
      await embedded?.stop();
    },
  };
}

/**
 * Runs a query that is cancelled when the signal fires: a request whose client stopped waiting stops
 * its work (and rolls back its transaction) instead of finishing for nobody. The error is then the
 * signal's reason (DEADLINE_EXCEEDED, CANCELED), not the database's.
 */
export type Cancellable = <T extends readonly postgres.MaybeRow[]>(
  query: postgres.PendingQuery<T>,
  signal: AbortSignal | undefined,
) => Promise<postgres.RowList<T>>;

/** What every entity store queries through: the pool, and cancellation by the request's signal. */
export abstract class Store {
  protected readonly sql: Sql;
  protected readonly cancellable: Cancellable;

  constructor(db: Pick<Database, "sql" | "cancellable">) {
    this.sql = db.sql;
    this.cancellable = db.cancellable;
  }
}

/** The parts of postgres.js's Query that cancelling needs (not in its typings). */
interface QueryInternals {
  /** Set (non-null) once the query is handed to a connection; before that it waits in the pool's queue. */
  state?: unknown;
  /** The query the connection is running, not one pipelined behind it. */
  active?: boolean;
  canceller?: ((query: unknown) => Promise<void>) | null;
}

/**
 * A query still queued in the pool is simply dropped. The one a connection is running is cancelled in
 * the server with a cancel request on a new connection (running: true), which PGlite's single-connection
 * socket cannot take. A query pipelined behind another on a connection is left alone: postgres.js
 * would send its cancel only once it runs and hand its reply to the query after it. (A cancel request
 * that arrives just after its statement finished may hit the connection's next statement, which then
 * fails with UNAVAILABLE: PostgreSQL's cancel protocol cannot tell them apart. A send statement, which
 * carries many callers' messages, is run again once instead: see MessageStore.store.)
 */
function cancellableQueries(running: boolean): Cancellable {
  return async (query, signal) => {
    if (signal === undefined) return query;
    signal.throwIfAborted();
    const cancel = () => {
      const internals = query as unknown as QueryInternals;
      const queued = internals.state == null;
      if (!queued && !(running && internals.active === true)) return;
      // postgres.js drops the promise of its cancel request, so a refused connection (database down)
      // would be an unhandled rejection: settle it here.
      const canceller = internals.canceller;
      internals.canceller = null;
      canceller?.(query).catch(() => {});
    };
    signal.addEventListener("abort", cancel, { once: true });
    try {
      return await query;
    } catch (error) {
      if (signal.aborted) throw signal.reason;
      throw error;
    } finally {
      signal.removeEventListener("abort", cancel);
    }
  };
}

/** PGlite served on a loopback port so the very same `postgres` client and SQL run against it. */
async function startEmbedded(dataDir: string, log: Logger) {
  const { PGlite } = await import("@electric-sql/pglite");
  const { PGLiteSocketServer } = await import("@electric-sql/pglite-socket");
  const dir = path.join(dataDir, "pg");
  await fs.mkdir(dir, { recursive: true });
  const db = await PGlite.create(dir);
  const server = new PGLiteSocketServer({ db, host: "127.0.0.1", port: 0 });
  await server.start();
  log.info({ dataDir: dir }, "embedded PostgreSQL (PGlite) started");
  return {
    url: `postgres://postgres@${server.getServerConn()}/postgres`,
    async stop() {
      await server.stop();
      await db.close();
    },
  };
}
