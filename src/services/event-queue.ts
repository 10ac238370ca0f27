/** What a transport may do for a stream besides iterating it (every part optional). */
export interface StreamOutput<T> {
  /**
   * Writes a message itself, faster than yielding it: true when the transport can take more at once,
   * a promise that resolves when it can (flow control), undefined for "not here, yield it".
   */
  write?(message: T): true | Promise<void> | undefined;
  /**
   * Ends the stream at the transport (HTTP/2 reset, socket close) for a client that stopped
   * reading, whom nothing sent in-band can reach any more.
   */
  cutOff?(error: unknown): void;
}

/**
 * A bounded queue between bus callbacks and one stream. When the consumer falls `limit` events behind,
 * the queue overflows instead of growing: the stream decides how to recover. onOverflow runs at the
 * moment it overflows, even when the consumer is not waiting for the next item.
 */
export class EventQueue<T> {
  private items: T[] = [];
  private waiter: (() => void) | undefined;
  private overflowed = false;
  private failure: unknown;
  /** The signal next() listens to: one listener per queue, not one per wait. */
  private watched: AbortSignal | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private idleTimerMs = 0;

  /**
   * While set and nothing is queued, push() hands each item straight to it, so a stream whose
   * transport takes events as they come costs no promise and no wake-up per event. It returns false
   * for an item it did not take; that item is queued as usual.
   */
  sink: ((item: T) => boolean) | undefined;

  constructor(private readonly limit: number, private readonly onOverflow?: () => void) {}

  push(item: T): void {
    if (this.overflowed) return;
    if (this.sink !== undefined && this.items.length === 0 && this.failure === undefined && this.sink(item)) return;
    if (this.items.length >= this.limit) {
      this.overflowed = true;
      this.items = [];
      this.onOverflow?.();
    } else {
      this.items.push(item);
    }
    this.wake();
  }

  /** Events may have been lost elsewhere (bus outage): the consumer gets "overflow" and recovers. */
  markLost(): void {
    this.overflowed = true;
    this.items = [];
    this.wake();
  }

  /** Ends the stream: the consumer's next() throws the error. */
  fail(error: unknown): void {
    this.failure ??= error;
    this.wake();
  }

  /**
   * The next item, "overflow" once after events were dropped, "aborted" when the signal fires, or
   * "idle" when nothing arrived for idleMs.
   */
  next(signal: AbortSignal): Promise<T | "overflow" | "aborted">;
  next(signal: AbortSignal, idleMs: number): Promise<T | "overflow" | "aborted" | "idle">;
  async next(signal: AbortSignal, idleMs = Infinity): Promise<T | "overflow" | "aborted" | "idle"> {
    let deadline = Infinity;
    for (;;) {
      if (signal.aborted) return "aborted";
      if (this.failure !== undefined) throw this.failure;
      if (this.overflowed) {
        this.overflowed = false;
        return "overflow";
      }
      if (this.items.length > 0) return this.items.shift()!;
      if (deadline === Infinity && idleMs !== Infinity) deadline = performance.now() + idleMs;
      const wait = deadline - performance.now();
      if (wait <= 0) return "idle";
      // One abort listener and one idle timer (re-armed with refresh()) per queue, instead of adding
      // and removing them for every wait: this runs once per event per open stream.
      if (this.watched !== signal) {
        this.watched = signal;
        signal.addEventListener("abort", () => this.wake(), { once: true });
      }
      if (wait !== Infinity) this.armIdleTimer(wait);
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  /** Stops the idle timer (the stream ended). */
  dispose(): void {
    clearTimeout(this.idleTimer);
  }

  /**
   * Wakes the waiter after about ms (within 1 ms). A wake-up before the deadline (the timer of an
   * earlier wait) only loops once more.
   */
  private armIdleTimer(ms: number): void {
    if (this.idleTimer && Math.abs(ms - this.idleTimerMs) <= 1) {
      this.idleTimer.refresh();
      return;
    }
    clearTimeout(this.idleTimer);
    this.idleTimerMs = ms;
    this.idleTimer = setTimeout(() => this.wake(), ms);
    // A pending idle timer must not keep a stopping process alive; it only wakes a waiter.
    this.idleTimer.unref();
  }

  private wake(): void {
    const waiter = this.waiter;
    if (waiter === undefined) return;
    this.waiter = undefined;
    waiter();
  }
}

/**
 * Why a stream's signal fired: Connect puts a ConnectError there for deadlines, and the server's
 * shutdown signal carries UNAVAILABLE, so clients learn to reconnect elsewhere.
 */
export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new Error("stream aborted");
}
