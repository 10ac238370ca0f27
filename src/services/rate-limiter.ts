import { ResourceExhaustedError } from "../errors.js";

interface Bucket {
  tokens: number;
  updatedMs: number;
}

/** Token bucket per key (tenant + user), local to this instance. */
export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();

  constructor(private readonly ratePerSecond: number, private readonly burst: number, private readonly now = Date.now) {}

  /** Takes one token or throws RESOURCE_EXHAUSTED with the wait until the next token. */
  take(key: string): void {
    const now = this.now();
    const bucket = this.buckets.get(key) ?? { tokens: this.burst, updatedMs: now };
    bucket.tokens = Math.min(this.burst, bucket.tokens + ((now - bucket.updatedMs) / 1000) * this.ratePerSecond);
    bucket.updatedMs = now;
    if (bucket.tokens < 1) {
      this.buckets.set(key, bucket);
      const waitMs = Math.ceil(((1 - bucket.tokens) / this.ratePerSecond) * 1000);
      throw new ResourceExhaustedError(`send rate limit of ${this.ratePerSecond} per second exceeded`, waitMs);
    }
    bucket.tokens -= 1;
    this.buckets.set(key, bucket);
    if (this.buckets.size > 100_000) this.forgetFullBuckets(now);
  }

  /** A full bucket is the same as no bucket: dropping those bounds memory by the active senders. */
  private forgetFullBuckets(now: number): void {
    for (const [key, bucket] of this.buckets) {
      if (bucket.tokens + ((now - bucket.updatedMs) / 1000) * this.ratePerSecond >= this.burst) this.buckets.delete(key);
    }
  }
}
