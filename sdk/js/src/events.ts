/**
 * Hands events to the application one at a time, in order: to every
 * listener of the event's type and to every open event iterator. The next
 * event waits until each listener has returned (and the promise it
 * returned, if any, has settled) and each iterator's consumer has asked for
 * the next event: that is when an event counts as handled (and, in auto
 * ack mode, when a push is acked). Until there is at least one listener or
 * iterator, events wait.
 */

export interface Typed {
  type: string;
}

type Listener<E> = (event: E) => unknown;

interface Queued<E> {
  event: E;
  handled: (() => void) | undefined;
}

/** An async iterator over the events; see `EventHub`. */
export class EventStream<E> implements AsyncIterableIterator<E> {
  private pending: Queued<E> | undefined;
  private inHand: (() => void) | undefined;
  private waiter: ((result: IteratorResult<E>) => void) | undefined;
  private ended = false;
  private detached = false;

  constructor(private readonly onDetach: (stream: EventStream<E>) => void) {}

  /** Resolves when the consumer asked for the event after this one (or left). */
  deliver(event: E): Promise<void> {
    return new Promise((resolve) => {
      if (this.detached) {
        resolve();
        return;
      }
      if (this.waiter !== undefined) {
        const waiter = this.waiter;
        this.waiter = undefined;
        this.inHand = resolve;
        waiter({ value: event, done: false });
      } else {
        this.pending = { event, handled: resolve };
      }
    });
  }

  /** No events follow the ones delivered so far. */
  end(): void {
    this.ended = true;
    if (this.waiter !== undefined && this.pending === undefined) {
      const waiter = this.waiter;
      this.waiter = undefined;
      this.detach();
      waiter({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<E>> {
    // Asking for the next event means the last one was handled.
    this.finishInHand();
    if (this.pending !== undefined) {
      const { event, handled } = this.pending;
      this.pending = undefined;
      this.inHand = handled;
      return Promise.resolve({ value: event, done: false });
    }
    if (this.ended || this.detached) {
      this.detach();
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve) => {
      this.waiter = resolve;
    });
  }

  /** Leaving the loop (`break`, `return`, a throw) stops this iterator. */
  return(): Promise<IteratorResult<E>> {
    this.finishInHand();
    this.pending?.handled?.();
    this.pending = undefined;
    this.detach();
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.({ value: undefined, done: true });
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): EventStream<E> {
    return this;
  }

  private finishInHand(): void {
    const handled = this.inHand;
    this.inHand = undefined;
    handled?.();
  }

  private detach(): void {
    if (!this.detached) {
      this.detached = true;
      this.onDetach(this);
    }
  }
}

export class EventHub<E extends Typed> {
  private readonly listeners = new Map<string, Set<Listener<E>>>();
  private readonly streams = new Set<EventStream<E>>();
  private readonly queue: Queued<E>[] = [];
  private draining = false;
  private finished = false;

  constructor(private readonly onListenerError: (error: unknown, event: E) => void) {}

  on(type: string, listener: Listener<E>): () => void {
    let set = this.listeners.get(type);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(type, set);
    }
    set.add(listener);
    this.kick();
    return () => this.off(type, listener);
  }

  off(type: string, listener: Listener<E>): void {
    this.listeners.get(type)?.delete(listener);
  }

  stream(): EventStream<E> {
    const stream = new EventStream<E>((s) => this.streams.delete(s));
    if (this.finished && this.queue.length === 0) {
      stream.end();
    } else {
      this.streams.add(stream);
      this.kick();
    }
    return stream;
  }

  /** Queues an event; `handled` runs once it was handled (see the module's note). */
  emit(event: E, handled?: () => void): void {
    this.queue.push({ event, handled });
    this.kick();
  }

  /** No event follows: iterators end once they had every queued event. */
  finish(): void {
    this.finished = true;
    this.kick();
  }

  private hasConsumers(): boolean {
    if (this.streams.size > 0) return true;
    for (const set of this.listeners.values()) if (set.size > 0) return true;
    return false;
  }

  private kick(): void {
    if (this.draining) return;
    this.draining = true;
    void this.drain().finally(() => {
      this.draining = false;
      if (this.queue.length > 0 && this.hasConsumers()) this.kick();
    });
  }

  private async drain(): Promise<void> {
    // Start on a later tick, so listeners added right after an emit still get it.
    await Promise.resolve();
    while (this.queue.length > 0 && this.hasConsumers()) {
      const { event, handled } = this.queue.shift()!;
      const waits: Promise<unknown>[] = [];
      for (const listener of [...(this.listeners.get(event.type) ?? [])]) {
        try {
          const result = listener(event);
          if (result !== null && typeof result === "object" && typeof (result as PromiseLike<unknown>).then === "function") {
            waits.push(Promise.resolve(result).catch((error: unknown) => this.onListenerError(error, event)));
          }
        } catch (error) {
          this.onListenerError(error, event);
        }
      }
      for (const stream of [...this.streams]) waits.push(stream.deliver(event));
      if (waits.length > 0) await Promise.all(waits);
      handled?.();
    }
    if (this.finished && this.queue.length === 0) {
      for (const stream of [...this.streams]) stream.end();
    }
  }
}
