import fs from "node:fs";
import { execFileSync } from "node:child_process";

/** CPU and memory of processes from /proc (Linux only). */
let clockTicks = 100;
try {
  clockTicks = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8", timeout: 2000 }).trim()) || 100;
} catch {
  /* the usual value */
}
let pageSize = 4096;
try {
  pageSize = Number(execFileSync("getconf", ["PAGESIZE"], { encoding: "utf8", timeout: 2000 }).trim()) || 4096;
} catch {
  /* the usual value */
}

export interface ProcSample {
  /** user + system CPU seconds */
  cpuSeconds: number;
  rssBytes: number;
  /** Seconds after boot at which the process started. */
  startedAfterBoot: number;
}

export function uptimeSeconds(): number {
  return Number(fs.readFileSync("/proc/uptime", "utf8").split(" ")[0]);
}

export function readProc(pid: number): ProcSample | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // fields[0] is field 3 (state): utime is field 14, stime 15, rss 24.
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    const rss = Number(fields[21]);
    const start = Number(fields[19]);
    return { cpuSeconds: (utime + stime) / clockTicks, rssBytes: rss * pageSize, startedAfterBoot: start / clockTicks };
  } catch {
    return undefined;
  }
}

/** Busy and total jiffies of the whole machine (all cores), from /proc/stat. */
export function readMachine(): { busy: number; total: number } {
  const line = fs.readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
  const values = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (values[3] ?? 0) + (values[4] ?? 0);
  const total = values.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}

/** Pids whose /proc/<pid>/comm equals name (read-only look-up, e.g. the local nats-server). */
export function pidsByComm(name: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (fs.readFileSync(`/proc/${entry}/comm`, "utf8").trim() === name) pids.push(Number(entry));
    } catch {
      /* gone */
    }
  }
  return pids;
}

export const cores = (() => {
  try {
    return fs.readFileSync("/proc/cpuinfo", "utf8").split("\n").filter((l) => l.startsWith("processor")).length || 1;
  } catch {
    return 1;
  }
})();

const FIXED_WORK_ITERATIONS = 1_000_000;
let fixedWorkResult = 0;

/**
 * CPU time (µs) this process spends on a fixed piece of arithmetic. Waiting for a core does not count,
 * so it grows only when the cores themselves are slower (a busy host, a busy sibling hyperthread, a
 * lower clock): compared with the same probe at the run's start, it tells a slow machine from a slow
 * Parley.
 */
export function fixedWorkCpuMicros(): number {
  const before = process.cpuUsage();
  let x = fixedWorkResult | 1;
  for (let i = 0; i < FIXED_WORK_ITERATIONS; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
  }
  const used = process.cpuUsage(before);
  fixedWorkResult = x; // kept, so the loop cannot be optimised away
  return used.user + used.system;
}

/** The probe's median over 15 runs: the reference taken when a benchmark starts. */
export function fixedWorkReference(): number {
  return sortedProbes(Array.from({ length: 15 }, fixedWorkCpuMicros)).median;
}

function sortedProbes(probes: number[]): { median: number; max: number } {
  const sorted = [...probes].sort((a, b) => a - b);
  return { median: sorted[Math.floor(sorted.length / 2)]!, max: sorted.at(-1)! };
}

export interface GroupUsage {
  /** CPU used over the window, in % of one core (200 = two cores busy). */
  cpuPercent: number;
  rssAvgMiB: number;
  rssMaxMiB: number;
  rssEndMiB: number;
}

export interface WindowUsage {
  seconds: number;
  /** The server's CPU % by thread name (main thread, V8 GC workers, libuv pool …), when a server ran. */
  serverThreads?: Record<string, number>;
  groups: Record<string, GroupUsage>;
  /** Whole machine busy, % of one core (max = cores × 100). */
  machineCpuPercent: number;
  /** Machine busy minus every group measured: other processes on the box. */
  otherCpuPercent: number;
  /** fixedWorkCpuMicros() sampled through the window: median and slowest. */
  fixedWorkMicros?: { median: number; max: number };
}

/** Pids of each named group of processes, looked up again at every sample (processes come and go). */
export type GroupLookup = () => Promise<Record<string, number[]>>;

interface Tracked {
  /** CPU seconds when first seen in the window (0 when the process started during the window). */
  first: number;
  last: number;
}

/**
 * Samples named groups of processes every interval. A window (start → stop) reports each group's CPU%
 * (sum over every pid seen in the group during the window, from first to last sighting) and RSS.
 */
export class Sampler {
  private timer: NodeJS.Timeout | undefined;
  private window:
    | {
        started: number;
        uptimeStart: number;
        machineStart: { busy: number; total: number };
        lookup: GroupLookup;
        cpu: Map<string, Map<number, Tracked>>;
        rss: Map<string, number[]>;
        fixedWork: number[];
      }
    | undefined;
  private sampling: Promise<void> = Promise.resolve();

  constructor(private readonly intervalMs = 500) {}

  async start(lookup: GroupLookup): Promise<void> {
    await this.stopTimer();
    this.window = { started: performance.now(), uptimeStart: uptimeSeconds(), machineStart: readMachine(), lookup, cpu: new Map(), rss: new Map(), fixedWork: [] };
    await this.sample();
    this.timer = setInterval(() => {
      this.sampling = this.sampling.then(() => this.sample()).catch(() => {});
    }, this.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<WindowUsage | undefined> {
    const window = this.window;
    await this.stopTimer();
    if (!window) return undefined;
    await this.sample();
    this.window = undefined;
    const seconds = (performance.now() - window.started) / 1000;
    const machineEnd = readMachine();
    const busyJiffies = machineEnd.busy - window.machineStart.busy;
    const totalJiffies = machineEnd.total - window.machineStart.total;
    const machineCpuPercent = totalJiffies > 0 ? (busyJiffies / totalJiffies) * cores * 100 : 0;
    const groups: Record<string, GroupUsage> = {};
    let measured = 0;
    const mib = (b: number) => Math.round((b / 1048576) * 10) / 10;
    for (const [name, tracked] of window.cpu) {
      let cpu = 0;
      for (const t of tracked.values()) cpu += t.last - t.first;
      const cpuPercent = seconds > 0 ? (cpu / seconds) * 100 : 0;
      measured += cpuPercent;
      const rss = window.rss.get(name) ?? [];
      groups[name] = {
        cpuPercent: Math.round(cpuPercent * 10) / 10,
        rssAvgMiB: rss.length ? mib(rss.reduce((a, b) => a + b, 0) / rss.length) : 0,
        rssMaxMiB: rss.length ? mib(Math.max(...rss)) : 0,
        rssEndMiB: rss.length ? mib(rss.at(-1)!) : 0,
      };
    }
    return {
      seconds: Math.round(seconds * 100) / 100,
      groups,
      machineCpuPercent: Math.round(machineCpuPercent * 10) / 10,
      otherCpuPercent: Math.round(Math.max(0, machineCpuPercent - measured) * 10) / 10,
      fixedWorkMicros: window.fixedWork.length ? sortedProbes(window.fixedWork) : undefined,
    };
  }

  private async sample(): Promise<void> {
    const window = this.window;
    if (!window) return;
    window.fixedWork.push(fixedWorkCpuMicros());
    const groups = await window.lookup();
    for (const [name, pids] of Object.entries(groups)) {
      let tracked = window.cpu.get(name);
      if (!tracked) window.cpu.set(name, (tracked = new Map()));
      let rss = 0;
      for (const pid of pids) {
        const now = readProc(pid);
        if (!now) continue;
        rss += now.rssBytes;
        const t = tracked.get(pid);
        if (t) t.last = now.cpuSeconds;
        else tracked.set(pid, { first: now.startedAfterBoot >= window.uptimeStart - 0.05 ? 0 : now.cpuSeconds, last: now.cpuSeconds });
      }
      const list = window.rss.get(name) ?? [];
      list.push(rss);
      window.rss.set(name, list);
    }
  }

  private async stopTimer(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.sampling;
  }
}

/** CPU seconds of each thread of a process, summed by thread name (main "node", V8 workers, libuv pool…). */
export function threadCpu(pid: number): Record<string, number> {
  const out: Record<string, number> = {};
  let tasks: string[] = [];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tasks) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
      const name = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")")).replace(/[0-9]+$/, "").trim() || "?";
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      // Node's helper threads (V8 GC and compiler workers, libuv pool) are mostly all called "node".
      const key = tid === String(pid) ? "main thread" : name === "node" ? "other threads" : name;
      out[key] = (out[key] ?? 0) + (Number(fields[11]) + Number(fields[12])) / clockTicks;
    } catch {
      /* thread gone */
    }
  }
  return out;
}
