import { UnavailableError } from "../errors.js";

/**
 * Fails with UNAVAILABLE when storage has not answered within ms. Streams use it for the queries they
 * make before their first message, so a frozen database cannot leave a client hanging (unary RPCs
 * get the same from the failFast interceptor).
 */
export async function withinStorageDeadline<T>(query: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      query,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new UnavailableError(`no answer from storage within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
