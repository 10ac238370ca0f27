import { ResourceExhaustedError } from "../errors.js";
import type { Caller } from "../auth/caller.js";

/** Caps the concurrent streams (Subscribe, WatchMessages, hub connections) of one user on this instance. */
export class StreamSlots {
  private readonly open = new Map<string, number>();

  constructor(private readonly maxPerUser: number) {}

  /** Takes a slot or throws RESOURCE_EXHAUSTED; call the returned function exactly once to free it. */
  acquire(caller: Caller): () => void {
    const key = `${caller.tenantId}\u0000${caller.userId}`;
    const count = this.open.get(key) ?? 0;
    if (count >= this.maxPerUser) {
      throw new ResourceExhaustedError(`at most ${this.maxPerUser} concurrent streams per user; close one first`);
    }
    this.open.set(key, count + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.open.get(key) ?? 1) - 1;
      if (left === 0) this.open.delete(key);
      else this.open.set(key, left);
    };
  }
}
