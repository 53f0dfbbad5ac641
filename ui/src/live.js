// Live state: one event stream for the session, fanned out to subscribers,
// and useLiveList, a list loaded once and kept current from the events.
import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { api } from './api.js';
import { byName } from './util.js';

const subscribers = new Set();
let controller = null;
let streamKey = null;
let connected = false;
const stateSubs = new Set();

export function isConnected() { return connected; }

export function startEvents(cluster) {
  const key = `${api.token}|${api.project}|${cluster ? 1 : 0}`;
  if (controller && streamKey === key) return;
  stopEvents();
  streamKey = key;
  controller = new AbortController();
  const params = { limit: 1 };
  if (cluster) params.cluster = 'true';
  api.stream('/v1/events/stream', {
    params,
    signal: controller.signal,
    onEvent: (ev) => { for (const fn of [...subscribers]) { try { fn(ev); } catch (e) { console.error(e); } } },
    onState: (s) => { connected = s === 'open'; for (const fn of [...stateSubs]) fn(connected); },
  });
}

export function stopEvents() {
  if (controller) controller.abort();
  controller = null;
  streamKey = null;
}

// Whether an event concerns the chosen project (cluster-wide events have
// no project and concern everybody who can see them).
export function inProject(ev) { return !ev.project || ev.project === api.project; }

export function useEvents(fn) {
  const ref = useRef(fn);
  ref.current = fn;
  useEffect(() => {
    const sub = (ev) => ref.current(ev);
    subscribers.add(sub);
    return () => subscribers.delete(sub);
  }, []);
}

export function useStreamState() {
  const [on, setOn] = useState(connected);
  useEffect(() => { stateSubs.add(setOn); return () => stateSubs.delete(setOn); }, []);
  return on;
}

// A list kept live. opts:
//   list: path of the list call (one call, large page)
//   item: name -> path of one object
//   key: object -> its name
//   objects: event object kinds that concern it
//   eventName: event -> the name to refetch (default ev.name), or null to ignore
//   project-scoped unless cluster: true
export function useLiveList(opts, deps = []) {
  const [items, setItems] = useState(null);
  const [error, setError] = useState(null);
  const optsRef = useRef(opts);
  optsRef.current = opts;
  // Names whose refetch is under way: { again } asks for one more call.
  const inflight = useRef(new Map());
  const gen = useRef(0);

  const upsert = useCallback((obj) => {
    const k = optsRef.current.key(obj);
    setItems((cur) => {
      const list = (cur || []).filter((x) => optsRef.current.key(x) !== k);
      list.push(obj);
      list.sort((a, b) => byName(optsRef.current.key(a), optsRef.current.key(b)));
      return list;
    });
  }, []);

  const remove = useCallback((name) => {
    setItems((cur) => (cur || []).filter((x) => optsRef.current.key(x) !== name));
  }, []);

  const refetch = useCallback((name) => {
    const my = gen.current;
    return api.get(optsRef.current.item(name)).then((obj) => {
      if (my !== gen.current) return;
      upsert(obj);
      followIfDeleting(obj, my);
    }, (e) => {
      if (my !== gen.current) return;
      if (e.status === 404) remove(name);
    });
  }, [upsert, remove]);

  // A removal records no event of its own: an object being deleted, from
  // a refetch or from the list itself, is looked at again each second
  // until it is gone.
  function followIfDeleting(obj, my) {
    if (obj && obj.spec && obj.spec.deleting) {
      setTimeout(() => { if (my === gen.current) refetch(optsRef.current.key(obj)); }, 1000);
    }
  }

  const reload = useCallback(() => {
    const my = ++gen.current;
    setError(null);
    return api.get(optsRef.current.list).then((r) => {
      if (my !== gen.current) return;
      const list = Array.isArray(r) ? r : (r && r.items) || [];
      list.sort((a, b) => byName(optsRef.current.key(a), optsRef.current.key(b)));
      setItems(list);
      for (const obj of list) followIfDeleting(obj, my);
    }, (e) => { if (my === gen.current) setError(e); });
  }, []);

  useEffect(() => {
    setItems(null);
    reload();
    return () => { gen.current++; inflight.current.clear(); };
  }, [api.project, ...deps]);

  useEvents((ev) => {
    const o = optsRef.current;
    if (!o.objects.includes(ev.object)) return;
    if (!o.cluster && !inProject(ev)) return;
    const name = o.eventName ? o.eventName(ev) : ev.name;
    if (!name) return;
    // The first event refetches at once; the ones that arrive while that
    // call runs coalesce into one more call, made as soon as it returns.
    const pending = inflight.current.get(name);
    if (pending) { pending.again = true; return; }
    const entry = { again: false };
    inflight.current.set(name, entry);
    const run = () => refetch(name).then(() => {
      if (inflight.current.get(name) !== entry) return;
      if (entry.again) { entry.again = false; run(); } else inflight.current.delete(name);
    });
    run();
  });

  return { items, error, reload, upsert, remove, refetch };
}

// A periodic metrics sample while mounted (not list state).
export function useInterval(fn, ms, deps = []) {
  const ref = useRef(fn);
  ref.current = fn;
  useEffect(() => {
    let alive = true;
    const tick = () => { if (alive && document.visibilityState !== 'hidden') ref.current(); };
    tick();
    const t = setInterval(tick, ms);
    return () => { alive = false; clearInterval(t); };
  }, [ms, ...deps]);
}

// One GET, loaded on mount (and when path changes); reload() refetches.
export function useFetch(path) {
  const [state, setState] = useState({ data: null, error: null });
  const [n, setN] = useState(0);
  useEffect(() => {
    if (!path) return undefined;
    let alive = true;
    api.get(path).then((data) => alive && setState({ data, error: null }), (error) => alive && setState({ data: null, error }));
    return () => { alive = false; };
  }, [path, n, api.project]);
  return { ...state, reload: () => setN((x) => x + 1), set: (data) => setState({ data, error: null }) };
}
