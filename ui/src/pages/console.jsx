// The Console tab: xterm.js over a WebSocket (loaded on demand; this module
// and xterm are their own chunk). Binary frames both ways.
import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { api, b64url, enc } from '../api.js';
import { announce } from '../components/ui.jsx';

let cssLoaded = false;
function loadCss() {
  if (cssLoaded) return;
  cssLoaded = true;
  const link = document.createElement('link');
  link.rel = 'stylesheet';
  // This chunk lives in assets/chunks/; the stylesheet in assets/.
  link.href = new URL('../xterm.css', import.meta.url).href;
  document.head.appendChild(link);
}

export function Console({ name }) {
  const holder = useRef(null);
  const termRef = useRef(null);
  const wsRef = useRef(null);
  const [status, setStatus] = useState({ state: 'connecting', text: 'Connecting…' });
  const [attempt, setAttempt] = useState(0);

  // The terminal lives as long as the tab.
  useEffect(() => {
    loadCss();
    const term = new Terminal({
      convertEol: false,
      cursorBlink: true,
      fontSize: window.innerWidth < 500 ? 12 : 14,
      fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace',
      scrollback: 5000,
      screenReaderMode: false,
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(holder.current);
    const ta = holder.current.querySelector('textarea');
    if (ta) ta.setAttribute('aria-label', `Console input of ${name}`);
    // F6 leaves the terminal (it otherwise keeps Tab for the guest).
    term.attachCustomKeyEventHandler((e) => {
      if (e.type === 'keydown' && e.key === 'F6') {
        e.preventDefault();
        const next = document.querySelector('[data-console-exit]');
        if (next) next.focus();
        return false;
      }
      return true;
    });
    const enc8 = new TextEncoder();
    const send = (data) => {
      const ws = wsRef.current;
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(typeof data === 'string' ? enc8.encode(data) : data);
    };
    term.onData(send);
    term.onBinary((s) => {
      const b = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i) & 255;
      send(b);
    });
    termRef.current = { term, fit };
    const refit = () => { try { fit.fit(); } catch { /* not visible */ } };
    requestAnimationFrame(refit);
    const ro = new ResizeObserver(refit);
    ro.observe(holder.current);
    window.addEventListener('orientationchange', refit);
    return () => {
      ro.disconnect();
      window.removeEventListener('orientationchange', refit);
      term.dispose();
      termRef.current = null;
    };
  }, [name]);

  // The connection: reconnects on demand.
  useEffect(() => {
    const t = termRef.current;
    if (!t) return undefined;
    let opened = false;
    let closedByUs = false;
    setStatus({ state: 'connecting', text: 'Connecting…' });
    const protocols = ['skyvisor.console', `skyvisor.bearer.${b64url(api.token || '')}`, `skyvisor.project.${b64url(api.project || '')}`];
    let ws;
    try {
      ws = new WebSocket(api.wsUrl(`/v1/instances/${enc(name)}/console/ws`), protocols);
    } catch (e) {
      setStatus({ state: 'error', text: `Cannot open the console: ${e.message}` });
      return undefined;
    }
    ws.binaryType = 'arraybuffer';
    wsRef.current = ws;
    ws.onopen = () => {
      opened = true;
      setStatus({ state: 'open', text: 'Connected' });
      announce(`Console of ${name} connected`);
      t.term.focus();
    };
    ws.onmessage = (m) => {
      if (typeof m.data === 'string') t.term.write(m.data);
      else t.term.write(new Uint8Array(m.data));
    };
    ws.onclose = async (ev) => {
      if (closedByUs) return;
      wsRef.current = null;
      if (ev.code >= 4000 && ev.code < 5000) {
        const status = ev.code - 4000;
        const text = ev.reason || `closed by the server (${status})`;
        setStatus({ state: 'refused', text, code: status });
        announce(`Console: ${text}`);
        if (status === 401) api.get('/v1/whoami').catch(() => {});
        return;
      }
      if (ev.code === 1000 || ev.code === 1001) {
        setStatus({ state: 'closed', text: 'console closed' });
        announce('Console closed');
        return;
      }
      if (!opened) {
        // Failed before opening: an expired token (401 → sign-in) or the network?
        const base = api.base;
        try {
          await api.get('/v1/whoami', { rounds: 2 });
          // The call failed over to another server: connect there.
          if (api.base !== base) { setAttempt((a) => a + 1); return; }
          setStatus({ state: 'closed', text: 'The console connection failed.' });
        } catch (e) {
          if (e.status === 401) return; // the app goes to sign-in
          setStatus({ state: 'closed', text: `Cannot reach the server: ${e.message}` });
        }
        return;
      }
      setStatus({ state: 'closed', text: `console closed (connection lost, code ${ev.code})` });
    };
    return () => { closedByUs = true; try { ws.close(1000); } catch { /* ignore */ } wsRef.current = null; };
  }, [name, attempt]);

  const showReconnect = status.state === 'closed' || status.state === 'refused' || status.state === 'error';
  return (
    <section class="console" aria-labelledby="h-console">
      <div class="console-head">
        <h2 id="h-console">Console</h2>
        <span class={`console-status cs-${status.state}`} role="status" data-testid="console-status">{status.text}</span>
        {showReconnect && <button type="button" data-console-exit onClick={() => setAttempt((a) => a + 1)} data-testid="console-reconnect">Reconnect</button>}
        {!showReconnect && <button type="button" data-console-exit onClick={() => termRef.current && termRef.current.term.focus()}>Focus terminal</button>}
      </div>
      <p class="muted small">Keys go to the guest; press F6 to leave the terminal.</p>
      <div class="terminal" ref={holder} role="region" aria-label={`Console of ${name}`} data-testid="console-terminal" />
    </section>
  );
}

export default Console;
