// Formatting helpers.
const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function fmtBytes(n, digits = 1) {
  if (n == null || Number.isNaN(n)) return '–';
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? Math.round(v) : v.toFixed(digits)} ${UNITS[i]}`;
}

export function fmtRate(bps) {
  if (bps == null || Number.isNaN(bps)) return '–';
  return `${fmtBytes(bps)}/s`;
}

export function fmtMiB(mib) { return fmtBytes(Number(mib) * 1024 * 1024, 0); }

export function fmtPct(p, digits = 0) {
  if (p == null || Number.isNaN(p)) return '–';
  return `${Number(p).toFixed(digits)}%`;
}

export function fmtDuration(secs) {
  if (secs == null || Number.isNaN(secs) || secs < 0) return '–';
  const s = Math.floor(secs);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  const d = Math.floor(h / 24);
  return `${d}d ${h % 24}h`;
}

export function fmtMs(ms) {
  if (ms == null) return '–';
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function since(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return null;
  return (Date.now() - t) / 1000;
}

export function ago(iso) {
  const s = since(iso);
  return s == null ? '–' : `${fmtDuration(Math.max(0, s))} ago`;
}

export function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const p = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function fmtClock(ms) {
  const d = new Date(ms);
  const p = (x) => String(x).padStart(2, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}`;
}

export function byName(a, b) { return a < b ? -1 : a > b ? 1 : 0; }

export const NAME_PATTERN = '[a-z]([-a-z0-9]{0,61}[a-z0-9])?';
