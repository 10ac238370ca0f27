/** Who is signed in, from the token's (unverified) claims: the server verifies it on every call. */
export interface Session {
  token: string;
  tenant: string;
  user: string;
}

// Per tab: two tabs can be two different users.
const STORAGE_KEY = "parley-demo-token";

/**
 * A token handed over in the address (`/#token=<JWT>`, removed from the address bar at once), else the
 * one this tab signed in with.
 */
export function takeToken(): string | undefined {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) {
    history.replaceState(null, "", location.pathname + location.search);
    return fromUrl.trim();
  }
  return sessionStorage.getItem(STORAGE_KEY) ?? undefined;
}

/** Reads the claims Parley uses; throws with a readable message for anything that is not such a JWT. */
export function sessionFromToken(token: string): Session {
  const payload = token.split(".")[1];
  let claims: { sub?: unknown; tid?: unknown; exp?: unknown };
  try {
    const bytes = Uint8Array.from(atob(payload!.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
    claims = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new Error("that is not a JWT");
  }
  if (typeof claims.sub !== "string" || typeof claims.tid !== "string") throw new Error("the token has no sub and tid claims");
  if (typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) throw new Error("the token has expired");
  return { token, tenant: claims.tid, user: claims.sub };
}

export function saveSession(session: Session): void {
  sessionStorage.setItem(STORAGE_KEY, session.token);
}

export function clearSession(): void {
  sessionStorage.removeItem(STORAGE_KEY);
}

/** Whether this server signs development tokens (POST /demo/token exists only in development mode). */
export async function devTokensAvailable(): Promise<boolean> {
  try {
    const res = await fetch("/demo/config.json");
    return res.ok && (await res.json()).devTokens === true;
  } catch {
    return false;
  }
}

/** A development token for any tenant and user. */
export async function devToken(tenant: string, user: string): Promise<string> {
  const res = await fetch("/demo/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ tenant, user }),
  });
  if (!res.ok) throw new Error((await res.text()).trim() || `sign-in failed (${res.status})`);
  return (await res.json()).token;
}
