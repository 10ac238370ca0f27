import type { ChildProcess } from "node:child_process";

/**
 * Every process the benchmark starts is registered here and ended by its pid at the end of the run,
 * on an error and on a signal: SIGTERM first (the server writes its CPU profile on a clean exit), then
 * SIGKILL for whatever did not exit.
 */
const children = new Map<number, { child: ChildProcess; name: string }>();

export function track(child: ChildProcess, name: string): ChildProcess {
  if (child.pid === undefined) throw new Error(`${name} did not start`);
  const pid = child.pid;
  children.set(pid, { child, name });
  child.once("exit", () => children.delete(pid));
  return child;
}

export function isRunning(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

/** Ends one child by pid: SIGTERM, then SIGKILL after graceMs. Resolves when it has exited. */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (!isRunning(child) || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  try {
    process.kill(child.pid, "SIGTERM");
  } catch {
    return;
  }
  const timer = new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), graceMs).unref());
  if ((await Promise.race([exited, timer])) === "timeout" && isRunning(child)) {
    try {
      process.kill(child.pid, "SIGKILL");
    } catch {
      /* already gone */
    }
    await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
  }
}

export async function stopAll(graceMs = 5000): Promise<void> {
  await Promise.all([...children.values()].map(({ child }) => stopChild(child, graceMs)));
}

/** Last resort (process 'exit' handler, synchronous): SIGKILL every child still registered. */
export function killAllNow(): void {
  for (const [pid] of children) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      /* already gone */
    }
  }
}
