/**
 * Keeping resume points across page loads or process restarts.
 *
 * The client keeps, per app, the last acked seq and broadcast seq, with the
 * server storage epoch they belong to, in memory. Given a `ResumeStore` it
 * also loads them once before its first connection and saves them each
 * time they change. The server keeps an ack cursor per device, so the
 * inbox resumes without a store too; what a store mainly saves is the
 * broadcasts (the server keeps no broadcast cursor: without
 * `last_broadcast_seq` a BIND gets every unexpired broadcast again).
 */

/** What is kept. Seqs and the epoch are decimal strings (u64 values do not fit a JSON number). */
export interface ResumeState {
  storageEpoch?: string | undefined;
  apps: Record<
    string,
    {
      /** The user BIND_OK named: an inbox seq is resumed only for the same user. */
      user?: string | undefined;
      lastSeq?: string | undefined;
      lastBroadcastSeq?: string | undefined;
    }
  >;
}

/** A place to keep resume points. Either method may be async; errors are ignored (the client goes on in memory). */
export interface ResumeStore {
  load(): ResumeState | undefined | Promise<ResumeState | undefined>;
  save(state: ResumeState): void | Promise<void>;
}

/** Keeps the state in memory (a test, or to hand one state to several clients in turn). */
export class MemoryStore implements ResumeStore {
  state: ResumeState | undefined;

  constructor(state?: ResumeState) {
    this.state = state === undefined ? undefined : clone(state);
  }

  load(): ResumeState | undefined {
    return this.state === undefined ? undefined : clone(this.state);
  }

  save(state: ResumeState): void {
    this.state = clone(state);
  }
}

/** The part of the Web Storage API this module uses (`localStorage`, `sessionStorage`). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/**
 * Keeps the state as JSON under one key of `localStorage` (or any
 * `StorageLike`). Use one key per device id and set of apps.
 */
export class LocalStorageStore implements ResumeStore {
  private readonly storage: StorageLike;

  constructor(
    private readonly key = "herald-client:resume",
    storage?: StorageLike,
  ) {
    const found = storage ?? (globalThis as { localStorage?: StorageLike }).localStorage;
    if (found === undefined) throw new Error("LocalStorageStore: no localStorage here; pass a StorageLike");
    this.storage = found;
  }

  load(): ResumeState | undefined {
    const text = this.storage.getItem(this.key);
    if (text === null) return undefined;
    return parseState(JSON.parse(text));
  }

  save(state: ResumeState): void {
    this.storage.setItem(this.key, JSON.stringify(state));
  }
}

const DECIMAL = /^(0|[1-9][0-9]{0,19})$/;

/** A u64 from its decimal form; undefined for anything else. */
export function parseU64(value: unknown): bigint | undefined {
  if (typeof value !== "string" || !DECIMAL.test(value)) return undefined;
  const n = BigInt(value);
  return n <= 0xffff_ffff_ffff_ffffn ? n : undefined;
}

/** Keeps only the well-formed parts of a loaded state. */
export function parseState(value: unknown): ResumeState | undefined {
  if (typeof value !== "object" || value === null) return undefined;
  const raw = value as { storageEpoch?: unknown; apps?: unknown };
  const state: ResumeState = { apps: {} };
  if (parseU64(raw.storageEpoch) !== undefined) state.storageEpoch = raw.storageEpoch as string;
  if (typeof raw.apps === "object" && raw.apps !== null) {
    for (const [app, entry] of Object.entries(raw.apps as Record<string, unknown>)) {
      if (typeof entry !== "object" || entry === null) continue;
      const e = entry as { user?: unknown; lastSeq?: unknown; lastBroadcastSeq?: unknown };
      const kept: ResumeState["apps"][string] = {};
      if (typeof e.user === "string") kept.user = e.user;
      if (parseU64(e.lastSeq) !== undefined) kept.lastSeq = e.lastSeq as string;
      if (parseU64(e.lastBroadcastSeq) !== undefined) kept.lastBroadcastSeq = e.lastBroadcastSeq as string;
      state.apps[app] = kept;
    }
  }
  return state;
}

function clone(state: ResumeState): ResumeState {
  return JSON.parse(JSON.stringify(state)) as ResumeState;
}

function base64UrlDecode(text: string): Uint8Array | undefined {
  if (!/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) return undefined;
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  try {
    const binary = atob(base64);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  } catch {
    return undefined;
  }
}

/**
 * The app and user a Herald token names (docs/protocol.md, Tokens), read
 * without checking its signature; undefined if the token is not of that
 * form. Used to resume an inbox only for the user the kept seq is from.
 */
export function tokenClaims(token: string): { app: string; user: string; expiresAt: bigint } | undefined {
  const parts = token.split(".");
  if (parts.length !== 2) return undefined;
  const claims = base64UrlDecode(parts[0]!);
  if (claims === undefined || claims.length < 1 || claims[0] !== 1) return undefined;
  const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  let at = 1;
  const str = (): string | undefined => {
    const len = claims[at];
    if (len === undefined || len === 0 || at + 1 + len > claims.length) return undefined;
    try {
      const value = decoder.decode(claims.subarray(at + 1, at + 1 + len));
      at += 1 + len;
      return value;
    } catch {
      return undefined;
    }
  };
  const app = str();
  const user = str();
  if (app === undefined || user === undefined || claims.length !== at + 8) return undefined;
  const expiresAt = new DataView(claims.buffer, claims.byteOffset + at, 8).getBigUint64(0);
  return { app, user, expiresAt };
}
