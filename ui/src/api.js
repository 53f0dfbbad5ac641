// The one API client of the console: bearer token and project headers,
// errors as ApiError (the API's own code/message/field), failover across
// the cluster's servers, and a server-sent events reader.

const LS_TOKEN = 'skyvisor.token';
const LS_PROJECT = 'skyvisor.project';
const LS_SERVERS = 'skyvisor.servers';
const LS_BASE = 'skyvisor.base';

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message || `HTTP ${status}`);
    this.name = 'ApiError';
    this.status = status;
    this.code = code || 'error';
    this.field = field || null;
  }
}

export class NetworkError extends Error {
  constructor(message) {
    super(message || 'no server answered');
    this.name = 'NetworkError';
    this.status = 0;
    this.code = 'network';
  }
}

function lsGet(k) { try { return localStorage.getItem(k); } catch { return null; } }
function lsSet(k, v) { try { if (v == null) localStorage.removeItem(k); else localStorage.setItem(k, v); } catch { /* private mode */ } }

const sleep = (ms, signal) => new Promise((res) => {
  const t = setTimeout(res, ms);
  if (signal) signal.addEventListener('abort', () => { clearTimeout(t); res(); }, { once: true });
});

function normBase(u) {
  if (!u) return '';
  const s = String(u).replace(/\/+$/, '');
  return s === location.origin ? '' : s;
}

export function b64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function query(params) {
  if (!params) return '';
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === '') continue;
    q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

class Client {
  constructor() {
    this.token = lsGet(LS_TOKEN);
    this.project = lsGet(LS_PROJECT);
    let servers = [];
    try { servers = JSON.parse(lsGet(LS_SERVERS) || '[]'); } catch { servers = []; }
    this.servers = Array.isArray(servers) ? servers : [];
    this.base = normBase(lsGet(LS_BASE) || '');
    this.reconnecting = false;
    this.listeners = new Set();
  }

  // Subscribers get ('unauthorized' | 'reconnecting' | 'token' | 'project').
  on(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); }
  emit(what, value) { for (const fn of [...this.listeners]) { try { fn(what, value); } catch (e) { console.error(e); } } }

  setToken(token) {
    this.token = token || null;
    lsSet(LS_TOKEN, this.token);
    this.emit('token', this.token);
  }

  setProject(project) {
    this.project = project || null;
    lsSet(LS_PROJECT, this.project);
    this.emit('project', this.project);
  }

  setServers(list) {
    this.servers = (list || []).map((s) => s.url).filter(Boolean);
    lsSet(LS_SERVERS, JSON.stringify(this.servers));
  }

  setReconnecting(on) {
    if (this.reconnecting === on) return;
    this.reconnecting = on;
    this.emit('reconnecting', on);
  }

  // The bases to try, the current one first.
  candidates() {
    const all = [this.base, '', ...this.servers.map(normBase)];
    return [...new Set(all)];
  }

  headers(extra) {
    const h = { Accept: 'application/json', ...extra };
    if (this.token) h.Authorization = `Bearer ${this.token}`;
    if (this.project) h['X-Skyvisor-Project'] = this.project;
    return h;
  }

  // fetch with failover: on a network error (the server is gone), try the
  // other servers in turn, with a pause between rounds, until one answers
  // (or `rounds` rounds have failed).
  async fetchAny(path, init, { rounds = 30, signal } = {}) {
    let lastErr = null;
    for (let round = 0; round < rounds; round++) {
      for (const base of this.candidates()) {
        if (signal && signal.aborted) throw new DOMException('aborted', 'AbortError');
        try {
          const res = await fetch(base + path, { ...init, signal, mode: base ? 'cors' : 'same-origin', credentials: 'omit' });
          if (base !== this.base) { this.base = base; lsSet(LS_BASE, base || null); }
          this.setReconnecting(false);
          return res;
        } catch (e) {
          if (e && e.name === 'AbortError') throw e;
          lastErr = e;
          this.setReconnecting(true);
        }
      }
      await sleep(Math.min(500 * (round + 1), 3000), signal);
    }
    this.setReconnecting(false);
    throw new NetworkError(lastErr ? `cannot reach any server: ${lastErr.message}` : 'cannot reach any server');
  }

  // method, path (under the API root, e.g. /v1/instances), options:
  // body (JSON), query, signal, auth401 (false: do not sign out on 401),
  // raw (return the Response).
  async request(method, path, opts = {}) {
    const init = { method, headers: this.headers(opts.headers) };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      init.headers['Content-Type'] = 'application/json';
    }
    const res = await this.fetchAny(path + query(opts.query), init, { signal: opts.signal, rounds: opts.rounds });
    if (!res.ok) {
      let code = null; let message = null; let field = null;
      try {
        const j = await res.json();
        if (j && j.error) { code = j.error.code; message = j.error.message; field = j.error.field; }
      } catch { /* not JSON */ }
      const err = new ApiError(res.status, code, message || `${res.status} ${res.statusText}`, field);
      if (res.status === 401 && opts.auth401 !== false) this.emit('unauthorized', err);
      throw err;
    }
    if (opts.raw) return res;
    if (res.status === 204) return null;
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  get(path, opts) { return this.request('GET', path, opts); }
  post(path, body, opts) { return this.request('POST', path, { ...opts, body: body === undefined ? {} : body }); }
  put(path, body, opts) { return this.request('PUT', path, { ...opts, body }); }
  patch(path, body, opts) { return this.request('PATCH', path, { ...opts, body }); }
  del(path, opts) { return this.request('DELETE', path, opts); }

  // Server-sent events: calls onEvent(eventJson, id) for each message, keeps
  // reconnecting (with Last-Event-ID, through failover) until signal aborts.
  // onState('open' | 'closed') reports the connection.
  async stream(path, { onEvent, onState, signal, params }) {
    let lastId = null;
    let failures = 0;
    while (!signal.aborted) {
      try {
        const q = lastId != null ? { ...params, limit: undefined } : params;
        const headers = this.headers({ Accept: 'text/event-stream' });
        if (lastId != null) headers['Last-Event-ID'] = lastId;
        const res = await this.fetchAny(path + query(q), { method: 'GET', headers, cache: 'no-store' }, { signal, rounds: 1e9 });
        if (res.status === 401) {
          let message = 'unauthorized';
          try { message = (await res.json()).error.message; } catch { /* ignore */ }
          this.emit('unauthorized', new ApiError(401, 'unauthorized', message));
          return;
        }
        if (!res.ok || !res.body) throw new ApiError(res.status, 'stream', `event stream answered ${res.status}`);
        failures = 0;
        if (onState) onState('open');
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        let ev = { data: [], event: null, id: null };
        let broken = false;
        while (!broken) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let nl;
          while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
            const line = buf.slice(0, nl);
            buf = buf.slice(nl + (buf[nl] === '\r' && buf[nl + 1] === '\n' ? 2 : 1));
            if (line === '') {
              if (ev.event === 'error') { broken = true; break; }
              if (ev.id != null) lastId = ev.id;
              if (ev.data.length) {
                let data = null;
                try { data = JSON.parse(ev.data.join('\n')); } catch { data = null; }
                if (data) { try { onEvent(data, ev.id); } catch (e) { console.error(e); } }
              }
              ev = { data: [], event: null, id: null };
              continue;
            }
            if (line.startsWith(':')) continue;
            const c = line.indexOf(':');
            const field = c < 0 ? line : line.slice(0, c);
            let val = c < 0 ? '' : line.slice(c + 1);
            if (val.startsWith(' ')) val = val.slice(1);
            if (field === 'data') ev.data.push(val);
            else if (field === 'event') ev.event = val;
            else if (field === 'id') ev.id = val;
          }
        }
        try { reader.cancel(); } catch { /* ignore */ }
      } catch (e) {
        if (signal.aborted || (e && e.name === 'AbortError')) return;
        failures++;
      }
      if (onState) onState('closed');
      await sleep(Math.min(1000 * (failures + 1), 5000), signal);
    }
  }

  wsUrl(path) {
    const base = this.base || location.origin;
    return base.replace(/^http/, 'ws') + path;
  }
}

export const api = new Client();

export const enc = encodeURIComponent;
