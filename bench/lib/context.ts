import crypto from "node:crypto";
import path from "node:path";
import postgres from "postgres";
import { Histogram, type HistogramData, type LatencySummary } from "./hist.js";
import { startParley, parseMetrics, type ParleyProcess } from "./parley-server.js";
import { pidsByComm, Sampler, threadCpu, type WindowUsage } from "./proc-stats.js";
import type { WorkerHandle } from "./worker-handle.js";

export interface Plan {
  quick: boolean;
  /** Duration of each offered-rate and saturation phase. */
  phaseMs: number;
  warmupMs: number;
  /** After sending stops: wait for the last deliveries until nothing arrives for quietMs (at most drainMaxMs). */
  quietMs: number;
  drainMaxMs: number;
  /** Before each phase: longest wait for the server to go idle (work left over from an overloaded phase). */
  settleMaxMs: number;
  heapSnapshotStreams: number;
  ratesChats10: number[];
  ratesChats100: number[];
  saturationConcurrency: number;
  fanout1Concurrency: number[];
  idleStreams: number[];
  dedicatedConnections: number;
  historySizes: number[];
  historyQueries: number;
  rawMs: number;
  textBytes: number;
  receiverConnectionsPerWorker: number;
  senderConnections: number;
}

export const fullPlan: Plan = {
  quick: false,
  phaseMs: 15_000,
  warmupMs: 3_000,
  quietMs: 3_000,
  drainMaxMs: 10_000,
  settleMaxMs: 15_000,
  heapSnapshotStreams: 1000,
  // The issue's rates (500 … 2,000), the target (2,500), and two lower ones to find what this box sustains.
  ratesChats10: [100, 250, 500, 1000, 1500, 2000, 2500],
  ratesChats100: [50, 100, 300, 500],
  saturationConcurrency: 64,
  fanout1Concurrency: [16, 64],
  idleStreams: [1000, 10_000],
  dedicatedConnections: 1000,
  historySizes: [10_000, 1_000_000],
  historyQueries: 200,
  rawMs: 10_000,
  textBytes: 100,
  receiverConnectionsPerWorker: 4,
  senderConnections: 2,
};

export const quickPlan: Plan = {
  ...fullPlan,
  quick: true,
  phaseMs: 3_000,
  warmupMs: 1_000,
  quietMs: 1_500,
  drainMaxMs: 5_000,
  settleMaxMs: 5_000,
  ratesChats10: [500, 2500],
  ratesChats100: [300],
  fanout1Concurrency: [64],
  idleStreams: [1000, 2000],
  dedicatedConnections: 300,
  heapSnapshotStreams: 500,
  historySizes: [10_000, 100_000],
  historyQueries: 100,
  rawMs: 2_000,
};

/** Everything a scenario needs: workers, the database, the sampler, and a way to start Parley. */
export class Context {
  readonly sampler = new Sampler(500);
  readonly natsPids = pidsByComm("nats-server");
  readonly admin: postgres.Sql;
  readonly databaseUrl: string;
  readonly dbName: string;
  server: ParleyProcess | undefined;
  private serverCount = 0;
  /** Where Parley runs from: the working tree, or an exported commit (BENCH_SERVER_REF). */
  serverRoot: string;

  constructor(
    readonly root: string,
    readonly plan: Plan,
    readonly baseDatabaseUrl: string,
    readonly natsUrl: string,
    readonly secret: string,
    readonly receivers: WorkerHandle[],
    readonly sender: WorkerHandle,
    readonly tmpDir: string,
    readonly profileDir: string | undefined,
    readonly log: (line: string) => void,
  ) {
    this.dbName = `parley_bench_${Date.now()}_${crypto.randomBytes(3).toString("hex")}`;
    const url = new URL(baseDatabaseUrl);
    url.pathname = `/${this.dbName}`;
    this.databaseUrl = url.toString();
    this.admin = postgres(baseDatabaseUrl, { max: 2, onnotice: () => {}, connect_timeout: 10 });
    this.serverRoot = root;
  }

  get workers(): WorkerHandle[] {
    return [...this.receivers, this.sender];
  }

  async createDatabase(): Promise<void> {
    await this.admin.unsafe(`CREATE DATABASE ${this.dbName}`);
  }

  async dropDatabase(): Promise<void> {
    await this.admin.unsafe(`DROP DATABASE IF EXISTS ${this.dbName} WITH (FORCE)`);
  }

  /** A connection to the bench database (for bulk loads and checks). */
  bench(max = 2): postgres.Sql {
    return postgres(this.databaseUrl, { max, onnotice: () => {}, connect_timeout: 10, types: { bigint: postgres.BigInt } });
  }

  /** Starts Parley, or a stand-in script (a floor for comparison) run the same way with extra environment. */
  async startServer(label: string, inspect = false, standIn?: StandIn): Promise<ParleyProcess> {
    if (this.server) await this.stopServer();
    this.serverCount++;
    this.server = await startParley({
      root: this.serverRoot,
      databaseUrl: this.databaseUrl,
      natsUrl: this.natsUrl,
      secret: this.secret,
      natsPrefix: `parley-bench-${crypto.randomBytes(3).toString("hex")}`,
      logFile: path.join(this.tmpDir, `server-${this.serverCount}-${label}.log`),
      profileDir: this.profileDir ? path.join(this.profileDir, `${this.serverCount}-${label}`) : undefined,
      inspect,
      script: standIn?.script,
      env: standIn?.env,
    });
    this.log(`${standIn ? `${standIn.script} (${JSON.stringify(standIn.env ?? {})})` : "parley"} started for ${label}: pid ${this.server.pid}, ${this.server.url}`);
    return this.server;
  }

  /** Stops the server; returns what it logged at warn or above, its final metrics, and its profile. */
  async stopServer(): Promise<ServerReport | undefined> {
    const server = this.server;
    if (!server) return undefined;
    this.server = undefined;
    let metrics: Record<string, number> = {};
    try {
      metrics = parseMetrics(await server.metrics(), [
        "parley_rpc_requests_total", "parley_bus_publish_failures_total", "parley_messages_sent_total",
        "parley_active_streams", "parley_bus_subscriptions",
      ]);
    } catch {
      /* the server may be gone */
    }
    const stopped = await server.stop();
    const problems = server.problems();
    const rpcErrors: Record<string, number> = {};
    for (const [key, value] of Object.entries(metrics)) {
      if (key.startsWith("parley_rpc_requests_total") && !key.includes('code="ok"')) rpcErrors[key.replace("parley_rpc_requests_total", "")] = value;
    }
    return {
      logFile: server.logFile,
      exit: { code: stopped.code, signal: stopped.signal },
      problems,
      rpcErrors,
      publishFailures: metrics["parley_bus_publish_failures_total"] ?? 0,
      messagesSent: metrics["parley_messages_sent_total"] ?? 0,
      profile: stopped.profile,
    };
  }

  /** Postgres processes: backends connected to the bench database plus the server's background processes. */
  async postgresPids(): Promise<number[]> {
    try {
      const rows = await this.admin`
        SELECT pid FROM pg_stat_activity WHERE datname = ${this.dbName} OR backend_type <> 'client backend'`;
      return rows.map((r) => r.pid as number);
    } catch {
      return [];
    }
  }

  async groups(extra: Record<string, number[]> = {}): Promise<Record<string, number[]>> {
    return {
      server: this.server ? [this.server.pid] : [],
      clients: this.workers.map((w) => w.pid),
      postgres: await this.postgresPids(),
      nats: this.natsPids,
      ...extra,
    };
  }

  private threadsAtStart: { pid: number; at: number; cpu: Record<string, number> } | undefined;

  async startWindow(extra: Record<string, number[]> = {}): Promise<void> {
    await this.sampler.start(() => this.groups(extra));
    this.threadsAtStart = this.server ? { pid: this.server.pid, at: performance.now(), cpu: threadCpu(this.server.pid) } : undefined;
  }

  async stopWindow(): Promise<WindowUsage | undefined> {
    const usage = await this.sampler.stop();
    const start = this.threadsAtStart;
    this.threadsAtStart = undefined;
    if (usage && start && this.server?.pid === start.pid) {
      const seconds = (performance.now() - start.at) / 1000;
      const end = threadCpu(start.pid);
      const threads: Record<string, number> = {};
      for (const [name, cpu] of Object.entries(end)) {
        const percent = ((cpu - (start.cpu[name] ?? 0)) / seconds) * 100;
        if (percent >= 0.5) threads[name] = Math.round(percent * 10) / 10;
      }
      usage.serverThreads = threads;
    }
    return usage;
  }

  /** Waits until the server used < 15% of a core over two 500 ms samples in a row; returns the ms waited. */
  async waitServerIdle(maxMs: number): Promise<number> {
    const { readProc } = await import("./proc-stats.js");
    const started = Date.now();
    let calm = 0;
    let before = readProc(this.server!.pid)?.cpuSeconds ?? 0;
    while (Date.now() - started < maxMs) {
      await sleep(500);
      const now = readProc(this.server!.pid)?.cpuSeconds ?? 0;
      calm = (now - before) / 0.5 < 0.15 ? calm + 1 : 0;
      before = now;
      if (calm >= 2) break;
    }
    return Date.now() - started;
  }

  /**
   * Other processes on the machine (the benchmark's own are idle between scenarios): waits up to maxMs
   * for the machine to be below `belowPercent` busy over 2 s; returns the last busy % seen.
   */
  async waitForQuietMachine(maxMs: number, belowPercent: number): Promise<{ busyPercent: number; waitedMs: number }> {
    const { readMachine, cores } = await import("./proc-stats.js");
    const started = Date.now();
    let busyPercent = 0;
    do {
      const a = readMachine();
      await sleep(2000);
      const b = readMachine();
      busyPercent = Math.round(((b.busy - a.busy) / Math.max(1, b.total - a.total)) * cores * 1000) / 10;
      if (busyPercent < belowPercent) break;
    } while (Date.now() - started < maxMs);
    return { busyPercent, waitedMs: Date.now() - started };
  }

  /**
   * Server RSS (median of samples over ~2 s) and V8 heap used. With the inspector open, a full GC runs
   * first and the heap figure is exact live data; otherwise it comes from /metrics and includes garbage.
   */
  async serverMemory(samples = 5): Promise<{ rssBytes: number; heapUsedBytes: number | undefined }> {
    const { readProc } = await import("./proc-stats.js");
    let afterGc: number | undefined;
    try {
      afterGc = (await this.server!.collectGarbage()).usedSize;
      await sleep(500);
    } catch {
      /* no inspector */
    }
    const values: number[] = [];
    for (let i = 0; i < samples; i++) {
      values.push(readProc(this.server!.pid)?.rssBytes ?? 0);
      await sleep(400);
    }
    values.sort((a, b) => a - b);
    let heapUsedBytes: number | undefined = afterGc;
    if (heapUsedBytes === undefined) {
      try {
        heapUsedBytes = parseMetrics(await this.server!.metrics(), ["nodejs_heap_size_used_bytes"])["nodejs_heap_size_used_bytes"];
      } catch {
        /* optional */
      }
    }
    return { rssBytes: values[Math.floor(values.length / 2)]!, heapUsedBytes };
  }
}

export interface StandIn {
  /** Entry point relative to the server root. */
  script: string;
  env?: Record<string, string>;
}

export interface ServerReport {
  logFile: string;
  exit: { code: number | null; signal: string | null };
  problems: Record<string, number>;
  rpcErrors: Record<string, number>;
  publishFailures: number;
  messagesSent: number;
  profile?: string;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export function summary(data: HistogramData | Histogram | undefined): LatencySummary {
  if (!data) return new Histogram().summary();
  return (data instanceof Histogram ? data : Histogram.from(data)).summary();
}

export function round(value: number, digits = 1): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}
