/**
 * Ends a stream at the transport (HTTP/2 reset, socket close) when its client stopped reading, so
 * nothing sent in-band can reach it any more. Given by the transport; optional.
 */
export type CutOff = (error: unknown) => void;

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

  constructor(private readonly limit: number, private readonly onOverflow?: () => void) {}

  push(item: T): void {
    if (this.overflowed) return;
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
    const deadline = performance.now() + idleMs;
    for (;;) {
      if (signal.aborted) return "aborted";
      if (this.failure !== undefined) throw this.failure;
      if (this.overflowed) {
        this.overflowed = false;
        return "overflow";
      }
      const item = this.items.shift();
      if (item !== undefined) return item;
      const wait = deadline - performance.now();
      if (wait <= 0) return "idle";
      await new Promise<void>((resolve) => {
        const timer = Number.isFinite(wait) ? setTimeout(() => done(), wait) : undefined;
        const done = () => {
          clearTimeout(timer);
          signal.removeEventListener("abort", done);
          this.waiter = undefined;
          resolve();
        };
        this.waiter = done;
        signal.addEventListener("abort", done);
      });
    }
  }

  private wake(): void {
    this.waiter?.();
  }
}

/**
 * Why a stream's signal fired: Connect puts a ConnectError there for deadlines, and the server's
 * shutdown signal carries UNAVAILABLE, so clients learn to reconnect elsewhere.
 */
export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new Error("stream aborted");
}
