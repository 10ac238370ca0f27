import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import WebSocket from "ws";
import { isRunning, stopChild, track } from "./children.js";

export interface ParleyProcess {
  pid: number;
  port: number;
  url: string;
  child: ChildProcess;
  logFile: string;
  /** Log lines at warn (40) or above, by message text, plus non-JSON stderr lines. */
  problems(): Record<string, number>;
  metrics(): Promise<string>;
  /** With `inspect`: forces a full GC through the inspector and returns V8's heap usage after it. */
  collectGarbage(): Promise<{ usedSize: number; totalSize: number }>;
  /** With `inspect`: writes a heap snapshot (after a GC) to file. */
  heapSnapshot(file: string): Promise<void>;
  stop(): Promise<{ code: number | null; signal: string | null; profile?: string }>;
}

export interface ParleyOptions {
  root: string;
  databaseUrl: string;
  natsUrl: string;
  secret: string;
  natsPrefix: string;
  logFile: string;
  /** Directory for --cpu-prof output; undefined: no profiling. */
  profileDir?: string;
  env?: Record<string, string>;
  /** Opens the inspector on a loopback port (used only to force GC before memory measurements). */
  inspect?: boolean;
  /** The entry point, relative to root: Parley's by default, or a stand-in such as bench/idle-floor-server.ts. */
  script?: string;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Starts `node --import tsx src/main.ts` (or options.script) as its own process and waits until /readyz answers 200. */
export async function startParley(options: ParleyOptions, readyTimeoutMs = 30_000): Promise<ParleyProcess> {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const args = ["--import", "tsx"];
  if (options.profileDir) {
    fs.mkdirSync(options.profileDir, { recursive: true });
    args.push("--cpu-prof", `--cpu-prof-dir=${options.profileDir}`);
  }
  if (options.inspect) args.push("--inspect=127.0.0.1:0");
  // V8 flags that NODE_OPTIONS refuses (--trace-gc, --trace-gc-nvp), for studying the server under load.
  if (process.env.BENCH_SERVER_NODE_ARGS) args.push(...process.env.BENCH_SERVER_NODE_ARGS.split(" ").filter(Boolean));
  args.push(options.script ?? "src/main.ts");
  let inspectorUrl: string | undefined;
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: process.env.HOME ?? "/tmp",
    NODE_ENV: "production",
    DATABASE_URL: options.databaseUrl,
    NATS_URL: options.natsUrl,
    PARLEY_NATS_PREFIX: options.natsPrefix,
    PARLEY_JWT_SECRET: options.secret,
    PARLEY_HOST: "127.0.0.1",
    PARLEY_PORT: String(port),
    PARLEY_LOG_LEVEL: "warn",
    PARLEY_SEND_RATE: "1000000",
    PARLEY_SEND_BURST: "1000000",
    PARLEY_DATA_DIR: path.join(path.dirname(options.logFile), "parley-data"),
    // Node/V8 flags for the server only, to compare settings (e.g. "--max-semi-space-size=64").
    ...(process.env.BENCH_SERVER_NODE_OPTIONS ? { NODE_OPTIONS: process.env.BENCH_SERVER_NODE_OPTIONS } : {}),
    ...options.env,
  };
  const log = fs.createWriteStream(options.logFile, { flags: "a" });
  const child = track(spawn(process.execPath, args, { cwd: options.root, env, stdio: ["ignore", "pipe", "pipe"] }), "parley");
  const problems: Record<string, number> = {};
  const collect = (stream: "stdout" | "stderr") => {
    let pending = "";
    child[stream]!.on("data", (chunk: Buffer) => {
      log.write(chunk);
      pending += chunk.toString("utf8");
      const lines = pending.split("\n");
      pending = lines.pop() ?? "";
      for (const line of lines) {
        if (!line.trim()) continue;
        const inspector = /Debugger listening on (ws:\/\/\S+)/.exec(line);
        if (inspector) inspectorUrl = inspector[1];
        if (inspector || line.startsWith("For help, see") || line.startsWith("Debugger ending") || line.startsWith("Debugger attached")) continue;
        let key: string;
        try {
          const entry = JSON.parse(line) as { level?: number; msg?: string; err?: { message?: string } };
          if ((entry.level ?? 0) < 40) continue;
          key = `${entry.level === 40 ? "warn" : "error"}: ${entry.msg ?? "?"}${entry.err?.message ? ` (${entry.err.message.slice(0, 120)})` : ""}`;
        } catch {
          key = `${stream}: ${line.slice(0, 160)}`;
        }
        problems[key] = (problems[key] ?? 0) + 1;
      }
    });
  };
  collect("stdout");
  collect("stderr");
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) =>
    child.once("exit", (code, signal) => resolve({ code, signal })),
  );

  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (!isRunning(child)) {
      const { code } = await exited;
      throw new Error(`parley exited with code ${code} before it was ready; see ${options.logFile}`);
    }
    try {
      const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(2000) });
      if (res.status === 200) break;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > deadline) {
      await stopChild(child, 2000);
      throw new Error(`parley was not ready within ${readyTimeoutMs} ms; see ${options.logFile}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }

  return {
    pid: child.pid!,
    port,
    url,
    child,
    logFile: options.logFile,
    problems: () => ({ ...problems }),
    async metrics() {
      const res = await fetch(`${url}/metrics`, { signal: AbortSignal.timeout(5000) });
      return res.text();
    },
    async collectGarbage() {
      return inspector(inspectorUrl, async (call) => {
        await call("HeapProfiler.collectGarbage");
        await call("HeapProfiler.collectGarbage");
        return (await call("Runtime.getHeapUsage")) as { usedSize: number; totalSize: number };
      });
    },
    async heapSnapshot(file: string) {
      const out = fs.createWriteStream(file);
      await inspector(inspectorUrl, async (call, on) => {
        on("HeapProfiler.addHeapSnapshotChunk", (params: { chunk: string }) => out.write(params.chunk));
        await call("HeapProfiler.takeHeapSnapshot", { reportProgress: false }, 300_000);
      });
      await new Promise<void>((resolve) => out.end(resolve));
    },
    async stop() {
      const before = options.profileDir ? new Set(fs.readdirSync(options.profileDir)) : undefined;
      // A clean exit writes the CPU profile; give graceful shutdown time, then SIGKILL.
      await stopChild(child, 25_000);
      const result = await Promise.race([exited, new Promise<{ code: null; signal: string }>((r) => setTimeout(() => r({ code: null, signal: "unknown" }), 3000))]);
      log.end();
      let profile: string | undefined;
      if (options.profileDir && before) {
        // One profile per thread: the main thread's is the largest (the other is tsx's module loader).
        const fresh = fs.readdirSync(options.profileDir).filter((f) => f.endsWith(".cpuprofile") && !before.has(f))
          .map((f) => path.join(options.profileDir!, f))
          .sort((a, b) => fs.statSync(b).size - fs.statSync(a).size);
        profile = fresh[0];
      }
      return { ...result, profile };
    },
  };
}

/** Picks `name{labels} value` lines out of Prometheus text. */
export function parseMetrics(text: string, names: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match || !names.includes(match[1]!)) continue;
    out[`${match[1]}${match[2] ?? ""}`] = Number(match[3]);
  }
  return out;
}

type Call = (method: string, params?: object, timeoutMs?: number) => Promise<any>;
type On = (event: string, handler: (params: any) => void) => void;

/** One short inspector session over the WebSocket the server printed at start-up. */
async function inspector<T>(url: string | undefined, use: (call: Call, on: On) => Promise<T>): Promise<T> {
  if (!url) throw new Error("the server runs without the inspector");
  const ws = new WebSocket(url, { maxPayload: 1 << 30 });
  try {
    await new Promise<void>((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("error", reject);
      setTimeout(() => reject(new Error("inspector did not answer")), 5000).unref();
    });
    let id = 0;
    const pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
    const handlers = new Map<string, (params: any) => void>();
    ws.on("message", (data: Buffer) => {
      const message = JSON.parse(data.toString()) as { id?: number; result?: unknown; error?: unknown; method?: string; params?: unknown };
      if (message.method) handlers.get(message.method)?.(message.params);
      if (message.id === undefined) return;
      const entry = pending.get(message.id);
      pending.delete(message.id);
      if (message.error) entry?.reject(new Error(JSON.stringify(message.error)));
      else entry?.resolve(message.result);
    });
    const call: Call = (method, params = {}, timeoutMs = 30_000) =>
      new Promise((resolve, reject) => {
        const my = ++id;
        pending.set(my, { resolve, reject });
        ws.send(JSON.stringify({ id: my, method, params }));
        setTimeout(() => reject(new Error(`${method} timed out`)), timeoutMs).unref();
      });
    return await use(call, (event, handler) => handlers.set(event, handler));
  } finally {
    ws.terminate();
  }
}
