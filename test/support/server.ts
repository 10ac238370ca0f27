import crypto from "node:crypto";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import postgres from "postgres";
import { SignJWT } from "jose";
import type { Test } from "uvu";
import { loadConfig } from "../../src/config.js";
import { createLogger } from "../../src/observability/logger.js";
import { startServer, type ParleyServer } from "../../src/server.js";
import { openDatabase, type Database } from "../../src/store/database.js";

export const TEST_SECRET = "parley-test-secret-0123456789abcdef-0123456789";

/** Real services, when CI provides them; otherwise the embedded database and the in-process bus. */
export const testDatabaseUrl = process.env.TEST_DATABASE_URL || undefined;
export const testNatsUrl = process.env.TEST_NATS_URL || undefined;

export function describeBackends(): string {
  return `database: ${testDatabaseUrl ? "PostgreSQL" : "embedded PGlite"}, bus: ${testNatsUrl ? "NATS" : "in-process"}`;
}

/** A fresh, empty database on the TEST_DATABASE_URL server; dropped by the returned function. */
export async function createTestDatabase(baseUrl: string): Promise<{ url: string; drop: () => Promise<void> }> {
  const name = `parley_test_${Date.now()}_${crypto.randomBytes(4).toString("hex")}`;
  const admin = postgres(baseUrl, { max: 1, onnotice: () => {} });
  await admin.unsafe(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(baseUrl);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    async drop() {
      const admin = postgres(baseUrl, { max: 1, onnotice: () => {} });
      await admin.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await admin.end();
    },
  };
}

/**
 * A migrated database for tests that use the stores directly: a fresh one on TEST_DATABASE_URL's server,
 * else PGlite in a temporary directory; close() removes it.
 */
async function openStoreTestDatabase(): Promise<{ db: Database; close: () => Promise<void> }> {
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-store-"));
  const database = testDatabaseUrl ? await createTestDatabase(testDatabaseUrl) : undefined;
  const log = createLogger("silent");
  const db = await openDatabase(loadConfig({ PARLEY_DATA_DIR: dataDir, DATABASE_URL: database?.url, PARLEY_JWT_SECRET: "x".repeat(32) }), log);
  return {
    db,
    async close() {
      await db.close();
      await database?.drop();
      await fs.rm(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * For suites that use the stores directly: opens a store test database before the suite and removes it
 * after, handing it to use() once open.
 */
export function useStoreTestDatabase(suite: Test, use: (db: Database) => void): void {
  let close: (() => Promise<void>) | undefined;
  suite.before(async () => {
    const opened = await openStoreTestDatabase();
    close = opened.close;
    use(opened.db);
  });
  suite.after(() => close?.());
}

export interface TestServer {
  server: ParleyServer;
  /** http://127.0.0.1:PORT */
  url: string;
  /** host:port for grpc-js */
  address: string;
  env: Record<string, string>;
  /** Stops the server (and keeps the data, for restart tests). */
  stop(): Promise<void>;
  /** Starts a new server on the same data. */
  restart(): Promise<TestServer>;
  /** Stops the server and deletes its data. */
  destroy(): Promise<void>;
  /** Another instance on the same PostgreSQL database and bus (needs TEST_DATABASE_URL). */
  peer(): Promise<TestServer>;
}

/**
 * Starts a real Parley server on a free loopback port with its own data: a temp directory for the
 * embedded database, or a fresh database on TEST_DATABASE_URL.
 */
export async function startTestServer(extraEnv: Record<string, string> = {}): Promise<TestServer> {
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-test-"));
  const database = testDatabaseUrl ? await createTestDatabase(testDatabaseUrl) : undefined;
  const env: Record<string, string> = {
    PARLEY_PORT: "0",
    PARLEY_HOST: "127.0.0.1",
    PARLEY_DATA_DIR: dataDir,
    PARLEY_JWT_SECRET: TEST_SECRET,
    PARLEY_LOG_LEVEL: process.env.PARLEY_LOG_LEVEL ?? "silent",
    PARLEY_NATS_PREFIX: `parley-test-${crypto.randomBytes(4).toString("hex")}`,
    ...(database ? { DATABASE_URL: database.url } : {}),
    ...(testNatsUrl ? { NATS_URL: testNatsUrl } : {}),
    ...extraEnv,
  };
  const cleanup = async () => {
    await database?.drop();
    await fs.rm(dataDir, { recursive: true, force: true });
  };
  const start = async (): Promise<TestServer> => {
    const config = loadConfig(env);
    const server = await startServer(config, createLogger(config.logLevel));
    const self: TestServer = {
      server,
      url: `http://127.0.0.1:${server.port}`,
      address: `127.0.0.1:${server.port}`,
      env,
      stop: () => server.close(),
      restart: async () => {
        await server.close();
        return start();
      },
      destroy: async () => {
        await server.close();
        await cleanup();
      },
      peer: async () => {
        if (!database) throw new Error("a peer instance needs TEST_DATABASE_URL (PGlite is single-process)");
        const peerDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-peer-"));
        const peerConfig = loadConfig({ ...env, PARLEY_DATA_DIR: peerDir });
        const peerServer = await startServer(peerConfig, createLogger(peerConfig.logLevel));
        const stopPeer = async () => {
          await peerServer.close();
          await fs.rm(peerDir, { recursive: true, force: true });
        };
        return {
          ...self,
          server: peerServer,
          url: `http://127.0.0.1:${peerServer.port}`,
          address: `127.0.0.1:${peerServer.port}`,
          stop: stopPeer,
          destroy: stopPeer,
          restart: () => Promise.reject(new Error("restart a peer by calling peer() again")),
        };
      },
    };
    return self;
  };
  return start();
}

/** A token for the test secret; claims can be overridden to build bad tokens. */
export async function tokenFor(tenant: string, user: string, claims: Record<string, unknown> = {}, secret = TEST_SECRET): Promise<string> {
  return new SignJWT({ tid: tenant, ...claims })
    .setProtectedHeader({ alg: "HS256" })
    .setSubject(user)
    .setIssuedAt()
    .setExpirationTime("1h")
    .sign(new TextEncoder().encode(secret));
}

/** A tenant id no other test run uses. */
export function uniqueTenant(label = "t"): string {
  return `${label}-${crypto.randomBytes(6).toString("hex")}`;
}
