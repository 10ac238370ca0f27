import crypto from "node:crypto";

const ID_BYTES = 16;
const MAC_BYTES = 16;

/**
 * Negotiate's connection tokens: `base64url(connection id ‖ expiry ‖ HMAC)`. They are signed with a
 * secret every instance shares, so the WebSocket may reach any instance (no sticky sessions), valid
 * for `ttlMs`, and accepted once per instance. They are not credentials: the WebSocket request is
 * authenticated by its own token like any other.
 */
export class ConnectionTokens {
  /** Ids redeemed on this instance until they expire (roughly in expiry order, enough for pruning). */
  private readonly redeemed = new Map<string, number>();

  constructor(
    private readonly key: Uint8Array,
    private readonly ttlMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  issue(): { connectionId: string; connectionToken: string } {
    const id = crypto.randomBytes(ID_BYTES);
    const expiry = Buffer.alloc(6);
    expiry.writeUIntBE(this.now() + this.ttlMs, 0, 6);
    const body = Buffer.concat([id, expiry]);
    return {
      connectionId: id.toString("base64url"),
      connectionToken: Buffer.concat([body, this.mac(body)]).toString("base64url"),
    };
  }

  /** The connection id of a valid token not used before, or undefined (unknown, expired or reused). */
  redeem(token: string): string | undefined {
    const bytes = Buffer.from(token, "base64url");
    if (bytes.length !== ID_BYTES + 6 + MAC_BYTES || bytes.toString("base64url") !== token) return undefined;
    const body = bytes.subarray(0, ID_BYTES + 6);
    if (!crypto.timingSafeEqual(this.mac(body), bytes.subarray(ID_BYTES + 6))) return undefined;
    const now = this.now();
    const expiry = body.readUIntBE(ID_BYTES, 6);
    this.prune(now);
    const id = body.subarray(0, ID_BYTES).toString("base64url");
    if (expiry <= now || this.redeemed.has(id)) return undefined;
    this.redeemed.set(id, expiry);
    return id;
  }

  private mac(body: Uint8Array): Buffer {
    const hmac = crypto.createHmac("sha256", this.key).update("parley-hub-connection\0").update(body);
    return hmac.digest().subarray(0, MAC_BYTES);
  }

  private prune(now: number): void {
    for (const [id, expiry] of this.redeemed) {
      if (expiry > now) break;
      this.redeemed.delete(id);
    }
  }
}
