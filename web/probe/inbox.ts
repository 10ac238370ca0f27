import type { toJson } from "@bufbuild/protobuf";

export type Json = ReturnType<typeof toJson>;

/** A stream's notifications as the test reads them: one at a time, or the stream's error once it ended. */
export class Inbox {
  private readonly events: Json[] = [];
  private error: string | undefined;

  push(event: Json): void {
    this.events.push(event);
  }

  fail(error: string): void {
    this.error = error;
  }

  /** The next notification, waiting up to timeoutMs; rejects with the stream's error if it ended. */
  async next(timeoutMs: number): Promise<Json> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const event = this.events.shift();
      if (event !== undefined) return event;
      if (this.error !== undefined) throw new Error(`stream ended: ${this.error}`);
      if (Date.now() > deadline) throw new Error(`no notification within ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
}
