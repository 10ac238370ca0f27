/** Reads a server stream in the background so tests can await items one by one with a timeout. */
export class StreamReader<T> {
  private readonly items: T[] = [];
  private waiters: (() => void)[] = [];
  private ended = false;
  error: unknown;

  constructor(stream: AsyncIterable<T>, readonly abort: AbortController = new AbortController()) {
    void (async () => {
      try {
        for await (const item of stream) {
          this.items.push(item);
          this.wake();
        }
      } catch (error) {
        this.error = error;
      } finally {
        this.ended = true;
        this.wake();
      }
    })();
  }

  /** The next item; throws when the stream ended (with its error) or nothing came within timeoutMs. */
  async next(timeoutMs = 5000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const item = this.items.shift();
      if (item !== undefined) return item;
      if (this.ended) throw this.error ?? new Error("stream ended");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no stream item within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** The next item matching the predicate, skipping others. */
  async nextMatching(predicate: (item: T) => boolean, timeoutMs = 5000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const item = await this.next(Math.max(1, deadline - Date.now()));
      if (predicate(item)) return item;
    }
  }

  /** Resolves with the stream's error once it has ended. */
  async ended_(timeoutMs = 5000): Promise<unknown> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      if (Date.now() > deadline) throw new Error(`stream did not end within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 50);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return this.error;
  }

  /** Items received so far and not yet consumed, after waiting quietMs for stragglers. */
  async drain(quietMs = 300): Promise<T[]> {
    await new Promise((resolve) => setTimeout(resolve, quietMs));
    return this.items.splice(0);
  }

  close(): void {
    this.abort.abort();
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }
}

/** Waits until condition() holds, polling; throws after timeoutMs. */
export async function until(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
