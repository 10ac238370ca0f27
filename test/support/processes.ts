// Real processes for fault-injection tests: a private nats-server, a private PostgreSQL cluster and a
// Parley server as a child process. Each uses a free port and a temp directory of its own (never the
// shared services on 4222/5432), is stopped by its PID, and is killed on exit if a test forgot it.
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import fsp from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Code } from "@connectrpc/connect";
import postgres from "postgres";
import { TEST_SECRET } from "./server.js";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

// ---------------------------------------------------------------------------------------------
// Safety net: whatever a test started is killed when the test process exits.

const tracked = new Map<number, { signal: NodeJS.Signals; group?: () => number[] }>();
process.once("exit", () => {
  for (const [pid, { signal, group }] of tracked) {
    const pids = [pid, ...(group?.() ?? [])];
    for (const p of pids) tryKill(p, "SIGCONT");
    for (const p of pids) tryKill(p, signal);
  }
});

function tryKill(pid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(pid, signal);
    return true;
  } catch {
    return false;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A TCP port that was free a moment ago (the OS picks it). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** True when something accepts TCP connections on 127.0.0.1:port. */
export function canConnect(port: number, timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once("connect", () => done(true));
    socket.once("error", () => done(false));
  });
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs: number, child?: ManagedChild): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child && child.exitCode !== undefined) {
      throw new Error(`${what}: process exited with ${child.exitCode} before it was ready\n${child.output().slice(-4000)}`);
    }
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`${what}: not ready within ${timeoutMs} ms\n${child?.output().slice(-4000) ?? ""}`);
    await sleep(100);
  }
}

/** A child process with its output kept (the last 256 KiB) and its exit awaited. */
class ManagedChild {
  readonly pid: number;
  exitCode: number | string | undefined;
  private readonly exited: Promise<void>;
  private chunks: string[] = [];
  private size = 0;

  constructor(readonly child: ChildProcess, signalOnExit: NodeJS.Signals, group?: () => number[]) {
    if (child.pid === undefined) throw new Error("process did not start");
    this.pid = child.pid;
    tracked.set(this.pid, { signal: signalOnExit, group });
    const keep = (data: Buffer) => {
      const text = data.toString("utf8");
      this.chunks.push(text);
      this.size += text.length;
      while (this.size > 256 * 1024 && this.chunks.length > 1) this.size -= this.chunks.shift()!.length;
    };
    child.stdout?.on("data", keep);
    child.stderr?.on("data", keep);
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        this.exitCode = code ?? signal ?? "unknown";
        tracked.delete(this.pid);
        resolve();
      });
    });
  }

  output(): string {
    return this.chunks.join("");
  }

  get running(): boolean {
    return this.exitCode === undefined;
  }

  signal(signal: NodeJS.Signals): void {
    if (this.running) tryKill(this.pid, signal);
  }

  /** Resolves true when the process has exited within timeoutMs. */
  async waitExit(timeoutMs: number): Promise<boolean> {
    if (!this.running) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    const result = await Promise.race([this.exited.then(() => true), timedOut]);
    clearTimeout(timer);
    return result;
  }

  /** Sends `signal`, then SIGKILL if the process is still there after graceMs. */
  async stop(signal: NodeJS.Signals, graceMs = 10_000): Promise<void> {
    if (!this.running) return;
    this.signal(signal);
    if (await this.waitExit(graceMs)) return;
    this.signal("SIGKILL");
    await this.waitExit(10_000);
  }
}

/** Direct children of a PID (from /proc), e.g. PostgreSQL's backends. */
function childPids(pid: number): number[] {
  const result: number[] = [];
  let entries: string[];
  try {
    entries = fs.readdirSync("/proc");
  } catch {
    return result;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      // pid (comm) state ppid …; comm may contain spaces and parentheses.
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) result.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// NATS

export interface NatsProcess {
  port: number;
  url: string;
  pid(): number | undefined;
  running(): boolean;
  /** Kills the server (SIGKILL by default: an outage, not a goodbye). */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again on the same port. */
  start(): Promise<void>;
  /** Kills it for good (for after hooks). */
  destroy(): Promise<void>;
}

export const NATS_SERVER = process.env.NATS_SERVER_BIN || "/usr/sbin/nats-server";

/** A private nats-server on a free loopback port. */
export async function startNats(): Promise<NatsProcess> {
  const port = await freePort();
  let current: ManagedChild | undefined;
  const start = async () => {
    const child = spawn(NATS_SERVER, ["-a", "127.0.0.1", "-p", String(port)], { stdio: ["ignore", "pipe", "pipe"] });
    current = new ManagedChild(child, "SIGKILL");
    await waitFor(`nats-server on ${port}`, () => canConnect(port), 15_000, current);
  };
  await start();
  return {
    port,
    url: `nats://127.0.0.1:${port}`,
    pid: () => current?.pid,
    running: () => current?.running ?? false,
    stop: async (signal = "SIGKILL") => {
      await current?.stop(signal, 5000);
    },
    start,
    destroy: async () => {
      await current?.stop("SIGKILL", 1000);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

export interface PostgresCluster {
  port: number;
  /** postgres://postgres@127.0.0.1:PORT/postgres */
  url: string;
  pid(): number | undefined;
  /** Immediate shutdown (SIGQUIT): every connection drops, nothing answers until start(). */
  stop(): Promise<void>;
  start(): Promise<void>;
  /** SIGSTOP to the postmaster and every backend: connections stay open but nothing answers. */
  freeze(): void;
  thaw(): void;
  destroy(): Promise<void>;
}

function postgresBinDir(): string {
  const root = "/usr/lib/postgresql";
  const versions = fs.existsSync(root)
    ? fs.readdirSync(root).filter((v) => fs.existsSync(path.join(root, v, "bin", "initdb"))).sort((a, b) => Number(b) - Number(a))
    : [];
  if (versions.length === 0) throw new Error("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin");
  return path.join(root, versions[0]!, "bin");
}

/** initdb refuses to run as root: run the cluster as the postgres user then. */
function clusterUser(): { uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const uid = Number(execFileSync("id", ["-u", "postgres"], { encoding: "utf8" }).trim());
  const gid = Number(execFileSync("id", ["-g", "postgres"], { encoding: "utf8" }).trim());
  return { uid, gid };
}

/** A private PostgreSQL cluster (initdb into a temp dir) on a free loopback port. */
export async function startPostgres(): Promise<PostgresCluster> {
  const bin = postgresBinDir();
  const user = clusterUser();
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), "parley-pg-"));
  const dataDir = path.join(dir, "data");
  const owned = user ? { uid: user.uid, gid: user.gid } : {};
  if (user) await fsp.chown(dir, user.uid, user.gid);
  const initdb = spawn(
    path.join(bin, "initdb"),
    ["-D", dataDir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
    { cwd: dir, stdio: ["ignore", "pipe", "pipe"], ...owned },
  );
  const init = new ManagedChild(initdb, "SIGKILL");
  if (!(await init.waitExit(120_000)) || init.exitCode !== 0) {
    await init.stop("SIGKILL");
    await fsp.rm(dir, { recursive: true, force: true });
    throw new Error(`initdb failed (${init.exitCode}):\n${init.output()}`);
  }
  const port = await freePort();
  const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
  let current: ManagedChild | undefined;
  const start = async () => {
    const child = spawn(
      path.join(bin, "postgres"),
      [
        "-D", dataDir, "-p", String(port),
        "-c", "listen_addresses=127.0.0.1", "-c", `unix_socket_directories=${dir}`,
        "-c", "fsync=off", "-c", "full_page_writes=off",
        "-c", "max_connections=60", "-c", "shared_buffers=16MB", "-c", "logging_collector=off",
      ],
      { cwd: dir, stdio: ["ignore", "pipe", "pipe"], ...owned },
    );
    const managed = new ManagedChild(child, "SIGQUIT", () => childPids(child.pid!));
    current = managed;
    await waitFor(`postgres on ${port}`, async () => {
      if (!(await canConnect(port))) return false;
      const sql = postgres(url, { max: 1, connect_timeout: 2, onnotice: () => {} });
      try {
        await sql`SELECT 1`;
        return true;
      } catch {
        return false;
      } finally {
        await sql.end({ timeout: 1 }).catch(() => {});
      }
    }, 60_000, managed);
  };
  const group = () => (current?.running ? [current.pid, ...childPids(current.pid)] : []);
  const stop = async () => {
    if (!current?.running) return;
    for (const pid of group()) tryKill(pid, "SIGCONT");
    const backends = childPids(current.pid);
    await current.stop("SIGQUIT", 10_000);
    // Backends leave on their own once the postmaster is gone; make sure, by PID.
    for (const pid of backends) tryKill(pid, "SIGKILL");
    // The port must be free before a restart can bind it.
    for (let i = 0; i < 50 && (await canConnect(port, 200)); i++) await sleep(100);
  };
  await start();
  return {
    port,
    url,
    pid: () => current?.pid,
    stop,
    start,
    freeze: () => {
      for (const pid of group()) tryKill(pid, "SIGSTOP");
    },
    thaw: () => {
      for (const pid of group()) tryKill(pid, "SIGCONT");
    },
    destroy: async () => {
      await stop();
      await fsp.rm(dir, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Parley as a child process

export interface ParleyProcess {
  pid: number;
  port: number;
  /** http://127.0.0.1:PORT */
  url: string;
  /** 127.0.0.1:PORT */
  address: string;
  env: Record<string, string>;
  running(): boolean;
  exitCode(): number | string | undefined;
  /** stdout + stderr so far (JSON log lines). */
  output(): string;
  signal(signal: NodeJS.Signals): void;
  waitExit(timeoutMs: number): Promise<boolean>;
  /** SIGTERM, then SIGKILL after graceMs. */
  stop(graceMs?: number): Promise<void>;
}

/**
 * The environment test/support/server.ts would build, for a server in another process: a fixed port
 * (the caller's choice, so a restarted process keeps it), the test secret, and the caller's data.
 */
export function parleyEnv(options: { port: number; dataDir: string; databaseUrl?: string; natsUrl?: string; extra?: Record<string, string> }): Record<string, string> {
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: process.env.HOME ?? os.tmpdir(),
    PARLEY_PORT: String(options.port),
    PARLEY_HOST: "127.0.0.1",
    PARLEY_DATA_DIR: options.dataDir,
    PARLEY_JWT_SECRET: TEST_SECRET,
    PARLEY_LOG_LEVEL: process.env.PARLEY_LOG_LEVEL ?? "warn",
    PARLEY_NATS_PREFIX: `parley-test-${Math.random().toString(16).slice(2, 10)}`,
    ...(options.databaseUrl ? { DATABASE_URL: options.databaseUrl } : {}),
    ...(options.natsUrl ? { NATS_URL: options.natsUrl } : {}),
    ...options.extra,
  };
  return env;
}

/** `node --import tsx src/main.ts` with exactly `env`; resolves once /healthz answers. */
export async function startParleyProcess(env: Record<string, string>, readyTimeoutMs = 90_000): Promise<ParleyProcess> {
  const port = Number(env.PARLEY_PORT);
  if (!port) throw new Error("startParleyProcess needs a fixed PARLEY_PORT");
  const child = spawn(process.execPath, ["--import", "tsx", "src/main.ts"], {
    cwd: repoRoot,
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const managed = new ManagedChild(child, "SIGKILL");
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitFor(`parley on ${port}`, async () => {
      try {
        const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        return res.status === 200;
      } catch {
        return false;
      }
    }, readyTimeoutMs, managed);
  } catch (error) {
    await managed.stop("SIGKILL");
    throw error;
  }
  return {
    pid: managed.pid,
    port,
    url,
    address: `127.0.0.1:${port}`,
    env,
    running: () => managed.running,
    exitCode: () => managed.exitCode,
    output: () => managed.output(),
    signal: (signal) => managed.signal(signal),
    waitExit: (timeoutMs) => managed.waitExit(timeoutMs),
    stop: (graceMs = 15_000) => managed.stop("SIGTERM", graceMs),
  };
}

/**
 * For a suite's after hook: a client or server left behind by a failed test (e.g. a NATS client that
 * keeps reconnecting to a killed nats-server) must not keep the test process alive until the runner's
 * 600 s limit. Exits with uvu's exit code a few seconds after the summary, unless the process ended by itself.
 */
export function exitSoonAfterSummary(ms = 5000): void {
  setTimeout(() => process.exit(), ms).unref();
}

/**
 * uvu prints a thrown error that has a `details` field (ConnectError has one) as an empty diff, so a
 * test failing with an unexpected RPC error would say nothing: this turns it into a plain Error.
 */
export function readable(error: unknown): unknown {
  if (error instanceof Error && "details" in error && !("expects" in error)) {
    const { code, rawMessage } = error as Error & { code?: unknown; rawMessage?: string };
    const plain = new Error(`${error.name}${typeof code === "number" ? ` ${Code[code] ?? code}` : ""}: ${rawMessage ?? error.message}`);
    plain.stack = `${plain.message}\n${error.stack?.split("\n").slice(1).join("\n") ?? ""}`;
    return plain;
  }
  return error;
}

/** A temp directory, removed by the returned function. */
export async function tempDir(prefix: string): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), prefix));
  return { dir, remove: () => fsp.rm(dir, { recursive: true, force: true }) };
}
