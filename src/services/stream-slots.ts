import { ResourceExhaustedError } from "../errors.js";
import type { Caller } from "../auth/caller.js";

/**
 * The open streams of this instance (Subscribe, WatchMessages, hub connections): caps them per user,
 * and ends them all on shutdown. Tracking them here keeps per-request work O(1); a shared abort
 * signal with one listener per open stream would make every request pay for every stream.
 */
export class StreamSlots {
  private readonly open = new Map<string, number>();
  private readonly slots = new Set<Slot>();
  private shutdownError: unknown;

  constructor(private readonly maxPerUser: number) {}

  /**
   * Takes a slot or throws RESOURCE_EXHAUSTED. end is how closeAll ends the stream in-band, and cutOff
   * how cutOffAll ends it at the transport. Call the returned function to free the slot (more calls do
   * nothing).
   */
  acquire(caller: Caller, end: (error: unknown) => void, cutOff?: (error: unknown) => void): () => void {
    if (this.shutdownError !== undefined) throw this.shutdownError;
    const key = `${caller.tenantId}\u0000${caller.userId}`;
    const count = this.open.get(key) ?? 0;
    if (count >= this.maxPerUser) {
      throw new ResourceExhaustedError(`at most ${this.maxPerUser} concurrent streams per user (close one first)`);
    }
    this.open.set(key, count + 1);
    const slot: Slot = { end, cutOff };
    this.slots.add(slot);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.slots.delete(slot);
      const left = (this.open.get(key) ?? 1) - 1;
      if (left === 0) this.open.delete(key);
      else this.open.set(key, left);
    };
  }

  /** Ends every open stream with the error (server shutdown). */
  closeAll(error: unknown): void {
    this.shutdownError = error;
    for (const slot of [...this.slots]) slot.end(error);
  }

  /**
   * Cuts off every stream still open: after closeAll, those are streams whose client stopped reading,
   * so their end waits behind flow control and would hold the shutdown until its timeout.
   */
  cutOffAll(error: unknown): void {
    for (const slot of [...this.slots]) slot.cutOff?.(error);
  }
}

interface Slot {
  end(error: unknown): void;
  cutOff?(error: unknown): void;
}
