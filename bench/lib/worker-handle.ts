import { fork, type ChildProcess } from "node:child_process";
import path from "node:path";
import { isRunning, stopChild, track } from "./children.js";

interface Reply {
  id: number;
  ok: boolean;
  result?: unknown;
  error?: string;
}

/** The parent's side of one load-worker process: commands over IPC, each with a timeout. */
export class WorkerHandle {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private readonly waiters = new Map<string, ((message: any) => void)[]>();
  readonly child: ChildProcess;

  constructor(readonly name: string, script: string, env: Record<string, string>, execArgv: string[] = []) {
    this.child = track(
      fork(path.resolve(script), [name], {
        execArgv: ["--import", "tsx", ...execArgv],
        env: { ...process.env, ...env },
        stdio: ["ignore", "inherit", "inherit", "ipc"],
      }),
      name,
    );
    this.child.on("message", (message: Reply & { type?: string }) => {
      if (message.type) {
        const waiters = this.waiters.get(message.type) ?? [];
        this.waiters.delete(message.type);
        for (const waiter of waiters) waiter(message);
        return;
      }
      const entry = this.pending.get(message.id);
      if (!entry) return;
      this.pending.delete(message.id);
      clearTimeout(entry.timer);
      if (message.ok) entry.resolve(message.result);
      else entry.reject(new Error(`${name}: ${message.error}`));
    });
    this.child.once("exit", (code, signal) => {
      for (const [id, entry] of this.pending) {
        clearTimeout(entry.timer);
        entry.reject(new Error(`${name} exited (code ${code}, signal ${signal}) during command ${id}`));
      }
      this.pending.clear();
    });
  }

  /** The next message {type} the child sends on its own (e.g. "listening"). */
  next<T = any>(type: string, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: no "${type}" within ${timeoutMs} ms`)), timeoutMs);
      const list = this.waiters.get(type) ?? [];
      list.push((message) => {
        clearTimeout(timer);
        resolve(message as T);
      });
      this.waiters.set(type, list);
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  call<T = any>(cmd: string, args: object, timeoutMs: number): Promise<T> {
    if (!isRunning(this.child)) return Promise.reject(new Error(`${this.name} is not running`));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${this.name}: ${cmd} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer });
      this.child.send({ id, cmd, args });
    });
  }

  stop(): Promise<void> {
    return stopChild(this.child, 3000);
  }
}
