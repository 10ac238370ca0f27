import { createContextKey } from "@connectrpc/connect";

/** Who is calling, taken only from a verified token. */
export interface Caller {
  tenantId: string;
  userId: string;
}

export const callerKey = createContextKey<Caller | undefined>(undefined, { description: "authenticated caller" });
