import { createContextKey } from "@connectrpc/connect";

/** Who is calling, taken only from a verified token. */
export interface Caller {
  tenantId: string;
  userId: string;
  /**
   * Fires when the caller stops waiting (its deadline passed, it cancelled or disconnected): the
   * queries of its request are cancelled in the database instead of finishing for nobody.
   */
  signal?: AbortSignal;
}

export const callerKey = createContextKey<Caller | undefined>(undefined, { description: "authenticated caller" });
