import { UnavailableError } from "./errors.js";

/**
 * Fails with UNAVAILABLE when the promise has not settled within ms. Used wherever a dependency
 * (PostgreSQL, NATS) may stop answering without closing its connection: unary RPCs (failFast), the
 * queries streams make before their first message, and the readiness pings.
 */
export async function withDeadline<T>(promise: PromiseLike<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new UnavailableError(`${what} gave no answer within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
