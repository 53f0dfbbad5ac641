// Small shared components: Dialog, ConfirmDialog, ErrorText, Field, Table,
// StateBadge, Bar, Sparkline, Chart, and the aria-live announcer.
import { useEffect, useRef, useState } from 'preact/hooks';
import { fmtClock } from '../util.js';

// ---- aria-live announcements (progress, results) ----
let announceFn = null;
export function announce(msg) { if (announceFn) announceFn(msg); }
export function LiveRegion() {
  const [msg, setMsg] = useState('');
  useEffect(() => {
    announceFn = (m) => { setMsg(''); setTimeout(() => setMsg(m), 30); };
    return () => { announceFn = null; };
  }, []);
  return <div class="sr-only" aria-live="polite" role="status" data-testid="live-region">{msg}</div>;
}

// ---- errors ----
export function ErrorText({ error, id }) {
  if (!error) return null;
  const msg = typeof error === 'string' ? error : error.message;
  return <p class="error-text" role="alert" id={id} data-testid="error-text" data-code={error.code || undefined}>{msg}</p>;
}

// A labelled input; `error` highlights it when error.field names it.
export function Field({ label, name, error, children, hint, id }) {
  const fid = id || `f-${name}`;
  const bad = error && error.field && (error.field === name || error.field.startsWith(`${name}.`) || error.field.startsWith(`${name}[`));
  return (
    <div class={`field${bad ? ' field-bad' : ''}`}>
      <label for={fid}>{label}</label>
      {children(fid, bad ? { 'aria-invalid': 'true', 'aria-describedby': `${fid}-err` } : {})}
      {hint && <small class="hint">{hint}</small>}
      {bad && <small class="field-error" id={`${fid}-err`}>{error.message}</small>}
    </div>
  );
}

// ---- dialogs: native <dialog> with showModal (the rest of the page is
// inert, so focus stays inside), Escape closes, focus returns to the opener.
export function Dialog({ title, onClose, children, testid, wide }) {
  const ref = useRef(null);
  useEffect(() => {
    const opener = document.activeElement;
    const d = ref.current;
    if (d && !d.open) {
      try { d.showModal(); } catch { d.setAttribute('open', ''); }
    }
    const first = d && (d.querySelector('[autofocus]') || d.querySelector('input, select, textarea, button:not(.dialog-x)'));
    if (first) first.focus();
    return () => {
      // Leave modal mode first: while modal, the rest of the page is inert.
      try { if (d && d.open) d.close(); } catch { /* ignore */ }
      if (opener && opener.focus && document.contains(opener)) opener.focus();
    };
  }, []);
  const onKey = (e) => {
    if (e.key === 'Escape') { e.preventDefault(); e.stopPropagation(); onClose(); return; }
    if (e.key !== 'Tab') return;
    // Keep Tab inside the dialog.
    const f = [...ref.current.querySelectorAll('a[href], button:not([disabled]), input:not([disabled]), select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex="-1"])')]
      .filter((el) => el.offsetParent !== null || el === document.activeElement);
    if (!f.length) return;
    const first = f[0]; const last = f[f.length - 1];
    if (e.shiftKey && document.activeElement === first) { e.preventDefault(); last.focus(); }
    else if (!e.shiftKey && document.activeElement === last) { e.preventDefault(); first.focus(); }
  };
  const tid = `dlg-${(testid || title).replace(/[^a-z0-9]+/gi, '-')}`;
  return (
    <dialog ref={ref} class={`dialog${wide ? ' dialog-wide' : ''}`} aria-labelledby={tid} data-testid={testid}
      onKeyDown={onKey} onCancel={(e) => { e.preventDefault(); onClose(); }}>
      <div class="dialog-head">
        <h2 id={tid}>{title}</h2>
        <button type="button" class="dialog-x icon" aria-label="Close" onClick={onClose}>×</button>
      </div>
      {children}
    </dialog>
  );
}

// A confirmation: one button to confirm, the API's error shown if refused.
export function ConfirmDialog({ title, message, confirmLabel = 'Confirm', danger, onConfirm, onClose, children }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true); setError(null);
    try { await onConfirm(); onClose(true); } catch (err) { setError(err); setBusy(false); }
  };
  return (
    <Dialog title={title} onClose={() => onClose(false)} testid="confirm-dialog">
      <form onSubmit={submit}>
        <p>{message}</p>
        {children}
        <ErrorText error={error} />
        <div class="dialog-actions">
          <button type="button" onClick={() => onClose(false)}>Cancel</button>
          <button type="submit" class={danger ? 'danger' : 'primary'} data-testid="confirm-button" disabled={busy} autofocus>
            {busy ? 'Working…' : confirmLabel}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

// A form dialog: children get (error); onSubmit returns a promise.
export function FormDialog({ title, submitLabel = 'Save', onSubmit, onClose, testid, children, wide }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true); setError(null);
    try {
      const r = await onSubmit();
      if (r === false) setBusy(false); else onClose(true);
    } catch (err) { setError(err); setBusy(false); announce(`Error: ${err.message}`); }
  };
  return (
    <Dialog title={title} onClose={() => onClose(false)} testid={testid} wide={wide}>
      <form onSubmit={submit} noValidate>
        {children(error)}
        <ErrorText error={error} />
        <div class="dialog-actions">
          <button type="button" onClick={() => onClose(false)}>Cancel</button>
          <button type="submit" class="primary" disabled={busy} data-testid="dialog-submit">{busy ? 'Working…' : submitLabel}</button>
        </div>
      </form>
    </Dialog>
  );
}

// ---- tables ----
export function Table({ caption, head, children, testid, empty, colSpan }) {
  return (
    <div class="table-wrap">
      <table data-testid={testid}>
        {caption && <caption class="sr-only">{caption}</caption>}
        <thead><tr>{head.map((h) => <th scope="col" key={h}>{h}</th>)}</tr></thead>
        <tbody>
          {children}
          {empty && <tr><td colSpan={colSpan || head.length} class="empty">{empty}</td></tr>}
        </tbody>
      </table>
    </div>
  );
}

export function StateBadge({ state, testid }) {
  return <span class={`badge st-${state || 'unknown'}`} data-testid={testid}>{state || 'unknown'}</span>;
}

export function Loading({ what }) { return <p class="muted" role="status">Loading {what}…</p>; }

// ---- bars and charts (hand-written SVG) ----
export function Bar({ value, max, label, text }) {
  const pct = max > 0 ? Math.min(100, (value / max) * 100) : 0;
  const level = pct >= 90 ? 'hi' : pct >= 70 ? 'mid' : 'lo';
  return (
    <div class="bar" role="meter" aria-label={label} aria-valuemin={0} aria-valuemax={max} aria-valuenow={value} aria-valuetext={text}>
      <div class={`bar-fill bar-${level}`} style={{ width: `${pct}%` }} />
      <span class="bar-text">{text}</span>
    </div>
  );
}

export function Progress({ value, max, label }) {
  const pct = max > 0 ? Math.min(100, (value / max) * 100) : 0;
  return (
    <div class="progress" role="progressbar" aria-label={label} aria-valuemin={0} aria-valuemax={100} aria-valuenow={Math.round(pct)}>
      <div class="progress-fill" style={{ width: `${pct}%` }} />
    </div>
  );
}

export function Sparkline({ values, max, label, width = 80, height = 22 }) {
  const v = (values || []).filter((x) => x != null && !Number.isNaN(x));
  if (v.length < 2) return <span class="muted spark-empty" aria-label={`${label}: no data`}>–</span>;
  const top = max || Math.max(...v, 1e-9);
  const step = width / (v.length - 1);
  const pts = v.map((x, i) => `${(i * step).toFixed(1)},${(height - 1 - (Math.min(x, top) / top) * (height - 2)).toFixed(1)}`).join(' ');
  return (
    <svg class="spark" width={width} height={height} viewBox={`0 0 ${width} ${height}`} role="img" aria-label={label}>
      <polyline points={pts} fill="none" stroke="currentColor" stroke-width="1.5" />
    </svg>
  );
}

// A line chart of one or more series over time.
// series: [{ name, values: [[ms, number]], color }]; fmt: value -> text.
export function Chart({ title, series, fmt, max: fixedMax, height = 140 }) {
  const width = 480;
  const padL = 56; const padB = 20; const padT = 8; const padR = 8;
  const all = series.flatMap((s) => s.values);
  const label = `${title} chart`;
  if (!all.length) {
    return (
      <figure class="chart">
        <figcaption>{title}</figcaption>
        <p class="muted chart-empty">No data yet.</p>
      </figure>
    );
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
  const vmax = fixedMax || Math.max(...all.map((p) => p[1]), 1e-9) * 1.1;
  const x = (t) => padL + ((t - t0) / (t1 - t0)) * (width - padL - padR);
  const y = (v) => padT + (1 - Math.min(v, vmax) / vmax) * (height - padT - padB);
  const ticks = [0, 0.5, 1].map((f) => f * vmax);
  const last = series.map((s) => (s.values.length ? s.values[s.values.length - 1][1] : null));
  return (
    <figure class="chart">
      <figcaption>
        {title}
        {series.map((s, i) => (
          <span class="legend" key={s.name}><span class="swatch" style={{ background: s.color }} />{s.name} {last[i] != null ? fmt(last[i]) : '–'}</span>
        ))}
      </figcaption>
      <svg viewBox={`0 0 ${width} ${height}`} role="img" aria-label={label} class="chart-svg">
        {ticks.map((v) => (
          <g key={v}>
            <line x1={padL} x2={width - padR} y1={y(v)} y2={y(v)} class="grid" />
            <text x={padL - 4} y={y(v) + 4} text-anchor="end" class="axis">{fmt(v)}</text>
          </g>
        ))}
        <text x={padL} y={height - 4} class="axis">{fmtClock(t0)}</text>
        <text x={width - padR} y={height - 4} text-anchor="end" class="axis">{fmtClock(t1)}</text>
        {series.map((s) => (
          <polyline key={s.name} fill="none" stroke={s.color} stroke-width="1.5" vector-effect="non-scaling-stroke"
            points={s.values.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ')} />
        ))}
        {series.filter((s) => s.values.length).map((s) => {
          const p = s.values[s.values.length - 1];
          return <circle key={`${s.name}-last`} cx={x(p[0])} cy={y(p[1])} r="2.5" fill={s.color} />;
        })}
      </svg>
    </figure>
  );
}

// Vertical bars (usage per month/day). bars: [{ label, value, text }]
export function BarChart({ title, bars, height = 160 }) {
  const width = 480; const padB = 22; const padT = 14;
  if (!bars.length) return <figure class="chart"><figcaption>{title}</figcaption><p class="muted">No data.</p></figure>;
  const max = Math.max(...bars.map((b) => b.value), 1e-9);
  const bw = width / bars.length;
  return (
    <figure class="chart">
      <figcaption>{title}</figcaption>
      <svg viewBox={`0 0 ${width} ${height}`} role="img" aria-label={`${title}: ${bars.map((b) => `${b.label} ${b.text}`).join(', ')}`} class="chart-svg chart-bars">
        {bars.map((b, i) => {
          const h = (b.value / max) * (height - padB - padT);
          return (
            <g key={b.label}>
              <rect x={i * bw + bw * 0.15} width={bw * 0.7} y={height - padB - h} height={Math.max(h, 0.5)} class="barrect" />
              <text x={i * bw + bw / 2} y={height - padB - h - 3} text-anchor="middle" class="axis">{b.text}</text>
              <text x={i * bw + bw / 2} y={height - 6} text-anchor="middle" class="axis">{b.label}</text>
            </g>
          );
        })}
      </svg>
    </figure>
  );
}

// Tabs as links (hash routes), with aria-current.
export function Tabs({ tabs, current }) {
  return (
    <nav class="tabs" aria-label="Sections">
      {tabs.map((t) => (
        <a key={t.id} href={t.href} aria-current={t.id === current ? 'page' : undefined} data-testid={`tab-${t.id}`}>{t.label}</a>
      ))}
    </nav>
  );
}

// An event's kind, who caused it and its message: the cells every event
// table ends with.
export function EventCells({ e }) {
  return (
    <>
      <td data-label="Event"><span class={`ev ev-${e.result}`}>{e.kind}</span></td>
      <td data-label="By">{e.identity || 'system'}</td>
      <td data-label="Message">{e.message}</td>
    </>
  );
}
