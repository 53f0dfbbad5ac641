// One instance: overview (state, addresses, host, type, events), actions,
// snapshots, migration with live progress, metrics charts and the console.
import { Fragment } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { inProject, useEvents, useFetch, useInterval } from '../live.js';
import { useSession } from '../session.js';
import { go, href } from '../route.js';
import {
  Chart, ConfirmDialog, ErrorText, EventCells, Field, FormDialog, Loading, Progress, StateBadge, Table, Tabs, announce,
} from '../components/ui.jsx';
import { CreateInstanceDialog, instanceAddrs, instancePhase, instanceType } from './instances.jsx';
import { ago, fmtBytes, fmtDuration, fmtMiB, fmtMs, fmtPct, fmtRate, fmtTime, since } from '../util.js';

// The console (and xterm.js) is loaded only when the Console tab opens.
function LazyConsole({ name }) {
  const [C, setC] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => { import('./console.jsx').then((m) => setC(() => m.Console), setError); }, []);
  if (error) return <ErrorText error={`Could not load the console: ${error.message}`} />;
  return C ? <C name={name} /> : <Loading what="console" />;
}

function useInstance(name) {
  const [inst, setInst] = useState(null);
  const [error, setError] = useState(null);
  const [gone, setGone] = useState(false);
  const load = () => api.get(`/v1/instances/${enc(name)}`).then((i) => { setInst(i); setError(null); setGone(false); }, (e) => {
    if (e.status === 404) setGone(true);
    setError(e);
  });
  useEffect(() => { setInst(null); setGone(false); load(); }, [name, api.project]);
  useEvents((ev) => {
    if (ev.object === 'instance' && ev.name === name && inProject(ev)) load();
  });
  return { inst, setInst, error, gone, load };
}

export function InstancePage({ name, tab }) {
  const { perms } = useSession();
  const { inst, setInst, error, gone, load } = useInstance(name);
  const [dialog, setDialog] = useState(null);
  const [actionError, setActionError] = useState(null);
  const [busy, setBusy] = useState(null);
  const [migrationId, setMigrationId] = useState(null);

  useEffect(() => {
    if (inst && inst.spec.migration && inst.spec.migration.id && !migrationId) setMigrationId(inst.spec.migration.id);
  }, [inst]);

  if (!inst) {
    return (
      <section>
        <p><a href="#/instances">← Instances</a></p>
        <h1>{name}</h1>
        {gone ? <p class="notice">Instance “{name}” does not exist (or was deleted).</p> : error ? <ErrorText error={error} /> : <Loading what="instance" />}
      </section>
    );
  }

  const phase = instancePhase(inst);
  const act = async (what, fn) => {
    setBusy(what); setActionError(null);
    try {
      const r = await fn();
      if (r && r.spec) setInst(r);
      announce(`${what} requested for ${name}`);
    } catch (e) { setActionError(e); announce(`Error: ${e.message}`); }
    setBusy(null);
  };
  const post = (what, path, body) => act(what, () => api.post(`/v1/instances/${enc(name)}/${path}`, body));

  const tabs = [
    { id: 'overview', label: 'Overview', href: href('instances', name) },
    { id: 'snapshots', label: 'Snapshots', href: href('instances', name, 'snapshots') },
    { id: 'metrics', label: 'Metrics', href: href('instances', name, 'metrics') },
    { id: 'console', label: 'Console', href: href('instances', name, 'console') },
  ];

  return (
    <section aria-labelledby="h-inst">
      <p class="crumbs"><a href="#/instances">← Instances</a></p>
      <div class="page-head">
        <h1 id="h-inst">{name} <StateBadge state={phase} testid="instance-state" /></h1>
      </div>
      {perms.canWrite && (
        <div class="actions" role="group" aria-label="Instance actions">
          <button type="button" data-testid="instance-action-start" disabled={!!busy || phase === 'running' || phase === 'deleting'}
            onClick={() => post('Start', 'start')}>Start</button>
          <button type="button" data-testid="instance-action-stop" disabled={!!busy || phase === 'stopped' || phase === 'deleting'}
            onClick={() => post('Stop', 'stop', {})}>Stop</button>
          <button type="button" data-testid="instance-action-reboot" disabled={!!busy || phase !== 'running'}
            onClick={() => post('Reboot', 'reboot')}>Reboot</button>
          <button type="button" data-testid="instance-action-resize" disabled={!!busy} onClick={() => setDialog('resize')}>Resize</button>
          <button type="button" data-testid="instance-action-snapshot" disabled={!!busy} onClick={() => setDialog('snapshot')}>Snapshot</button>
          {perms.clusterAdmin && (
            <button type="button" data-testid="instance-action-migrate" disabled={!!busy || phase !== 'running'} onClick={() => setDialog('migrate')}>Migrate</button>
          )}
          <button type="button" class="danger" data-testid="instance-action-delete" disabled={!!busy} onClick={() => setDialog('delete')}>Delete</button>
        </div>
      )}
      {busy && <p class="muted" role="status">{busy}…</p>}
      <ErrorText error={actionError} />
      {migrationId && <MigrationProgress id={migrationId} onDone={load} canCancel={perms.clusterAdmin} name={name} />}
      <Tabs tabs={tabs} current={tab} />
      {tab === 'overview' && <Overview inst={inst} />}
      {tab === 'snapshots' && <Snapshots inst={inst} canWrite={perms.canWrite} onChanged={load} />}
      {tab === 'metrics' && <InstanceMetrics name={name} />}
      {tab === 'console' && (
        <LazyConsole name={name} />
      )}

      {dialog === 'delete' && <DeleteDialog name={name} running={phase !== 'stopped' && phase !== 'failed'} onClose={(ok) => { setDialog(null); if (ok) { announce(`Deleting ${name}`); go('/instances'); } }} />}
      {dialog === 'resize' && <ResizeDialog inst={inst} onClose={() => setDialog(null)} onDone={setInst} />}
      {dialog === 'snapshot' && (
        <TakeSnapshotDialog name={name} onClose={(ok) => { setDialog(null); if (ok) go(`/instances/${enc(name)}/snapshots`); }} />
      )}
      {dialog === 'migrate' && <MigrateDialog inst={inst} onClose={() => setDialog(null)} onStarted={(m) => setMigrationId(m.id)} />}
    </section>
  );
}

function DeleteDialog({ name, running, onClose }) {
  const [force, setForce] = useState(running);
  const [withSnaps, setWithSnaps] = useState(false);
  return (
    <ConfirmDialog title={`Delete ${name}?`} danger confirmLabel="Delete"
      message={`The instance ${name} and its disk will be deleted.`}
      onConfirm={() => api.del(`/v1/instances/${enc(name)}`, { query: { force: force ? 'true' : undefined, with_snapshots: withSnaps ? 'true' : undefined } })}
      onClose={onClose}>
      <label class="check" for="del-force"><input id="del-force" type="checkbox" checked={force} onChange={(e) => setForce(e.currentTarget.checked)} data-testid="delete-force" /> Stop it first if it runs (force)</label>
      <label class="check" for="del-snaps"><input id="del-snaps" type="checkbox" checked={withSnaps} onChange={(e) => setWithSnaps(e.currentTarget.checked)} /> Delete its snapshots too</label>
    </ConfirmDialog>
  );
}

function Overview({ inst }) {
  const s = inst.spec; const st = inst.status;
  const phase = instancePhase(inst);
  const rows = [
    ['State', <>{phase}{st.message ? ` — ${st.message}` : ''}</>],
    ['Kind', s.kind || 'vm'],
    ['Addresses', instanceAddrs(inst).join(', ') || '–'],
    ['Network', s.network ? `${s.network.network} (${s.network.ip}/${s.network.prefix_len}, gw ${s.network.gateway}, ${s.network.mac})` : '–'],
    ['Host', st.host || s.host || '–'],
    ['Type', instanceType(inst)],
    ['Resources', `${s.resources.vcpus} vCPU, ${fmtMiB(s.resources.memory_mib)}, ${s.resources.disk_gib} GiB disk`],
    ['Image', s.image],
    ['Uptime', phase === 'running' && st.started_at ? fmtDuration(since(st.started_at)) : '–'],
    ['Boots / restarts', `${st.boot_count} / ${st.restart_count}`],
    ['HA', `${s.ha || 'default'}${inst.protection ? ` — ${inst.protection.state}${inst.protection.reasons.length ? `: ${inst.protection.reasons.join('; ')}` : ''}` : ''}`],
    ['Volumes', (s.volumes || []).map((v) => `${v.name}${v.root ? ' (root)' : ''}`).join(', ') || '–'],
    ['Security groups', (s.security_groups || []).join(', ') || '–'],
    ['Labels', Object.entries(s.labels || {}).map(([k, v]) => (v ? `${k}=${v}` : k)).join(', ') || '–'],
    ['Guest', st.guest_ready ? 'ready' : 'not ready'],
    ['Last exit', st.last_exit ? `${st.last_exit.reason} ${ago(st.last_exit.at)}: ${st.last_exit.detail}` : '–'],
    ['Restored from', st.restored_from || '–'],
    ['Created', fmtTime(s.created_at)],
  ];
  return (
    <div class="overview">
      <dl class="props">
        {rows.map(([k, v]) => <div key={k}><dt>{k}</dt><dd>{v}</dd></div>)}
      </dl>
      <InstanceEvents name={s.name} />
    </div>
  );
}

function InstanceEvents({ name }) {
  const [events, setEvents] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    setEvents(null);
    api.get('/v1/events', { query: { instance: name, limit: 100 } }).then((r) => setEvents(r.slice().reverse()), setError);
  }, [name]);
  useEvents((ev) => {
    if (ev.object !== 'instance' || ev.name !== name || !inProject(ev)) return;
    setEvents((cur) => (cur && !cur.some((e) => e.seq === ev.seq) ? [ev, ...cur] : cur));
  });
  return (
    <section aria-labelledby="h-ievents">
      <h2 id="h-ievents">Events</h2>
      <ErrorText error={error} />
      {!events && !error ? <Loading what="events" /> : events && (
        <Table caption="Events of this instance" head={['Time', 'Event', 'By', 'Message']} testid="instance-events"
          empty={events.length ? null : 'No events.'}>
          {events.map((e) => (
            <tr key={`${e.seq}-${e.kind}`}>
              <td data-label="Time">{fmtTime(e.at)}</td>
              <EventCells e={e} />
            </tr>
          ))}
        </Table>
      )}
    </section>
  );
}

function ResizeDialog({ inst, onClose, onDone }) {
  const types = useFetch('/v1/types');
  const [t, setT] = useState(inst.spec.instance_type || '');
  return (
    <FormDialog title={`Resize ${inst.spec.name}`} submitLabel="Resize" testid="resize-dialog" onClose={onClose}
      onSubmit={async () => { const r = await api.post(`/v1/instances/${enc(inst.spec.name)}/resize`, { instance_type: t || (types.data && types.data[0].name) }); onDone(r); }}>
      {(error) => (
        <>
          <p class="muted">A running instance is restarted by its agent with the new size.</p>
          <Field label="Type" name="instance_type" error={error}>
            {(id, a) => (
              <select id={id} {...a} value={t} onChange={(e) => setT(e.currentTarget.value)} data-testid="resize-type">
                {!inst.spec.instance_type && <option value="">choose…</option>}
                {(types.data || []).map((ty) => <option key={ty.name} value={ty.name}>{ty.name} — {ty.resources.vcpus} vCPU, {fmtMiB(ty.resources.memory_mib)}</option>)}
              </select>
            )}
          </Field>
        </>
      )}
    </FormDialog>
  );
}

function TakeSnapshotDialog({ name, onClose }) {
  const [snap, setSnap] = useState('');
  return (
    <FormDialog title={`Snapshot ${name}`} submitLabel="Take snapshot" testid="snapshot-dialog" onClose={onClose}
      onSubmit={async () => { await api.post(`/v1/instances/${enc(name)}/snapshots`, { name: snap.trim() || null }); announce('Snapshot requested'); }}>
      {(error) => (
        <Field label="Snapshot name (optional)" name="name" error={error} hint="A running VM gets a live full snapshot (it pauses for a few ms).">
          {(id, a) => <input id={id} {...a} value={snap} onInput={(e) => setSnap(e.currentTarget.value)} autocomplete="off" data-testid="snapshot-name" />}
        </Field>
      )}
    </FormDialog>
  );
}

function MigrateDialog({ inst, onClose, onStarted }) {
  const hosts = useFetch('/v1/hosts');
  const [to, setTo] = useState('');
  const current = inst.status.host || inst.spec.host;
  return (
    <FormDialog title={`Migrate ${inst.spec.name}`} submitLabel="Migrate" testid="migrate-dialog" onClose={onClose}
      onSubmit={async () => { const m = await api.post(`/v1/instances/${enc(inst.spec.name)}/migrate`, to ? { to } : {}); onStarted(m); }}>
      {(error) => (
        <Field label="Target host" name="to" error={error}>
          {(id, a) => (
            <select id={id} {...a} value={to} onChange={(e) => setTo(e.currentTarget.value)} data-testid="migrate-target">
              <option value="">automatic (placement chooses)</option>
              {(hosts.data || []).filter((h) => h.host.name !== current).map((h) => (
                <option key={h.host.name} value={h.host.name} disabled={h.state !== 'ready'}>{h.host.name} ({h.state})</option>
              ))}
            </select>
          )}
        </Field>
      )}
    </FormDialog>
  );
}

const TERMINAL = ['completed', 'failed', 'cancelled'];

function MigrationProgress({ id, onDone, canCancel, name }) {
  const [m, setM] = useState(null);
  const [error, setError] = useState(null);
  const [hidden, setHidden] = useState(false);
  const running = !m || !TERMINAL.includes(m.phase);
  useInterval(() => {
    if (!running) return;
    api.get(`/v1/migrations/${enc(id)}`).then((r) => {
      setM(r); setError(null);
      if (TERMINAL.includes(r.phase)) { announce(`Migration ${r.phase}`); onDone(); }
    }, setError);
  }, 500, [id, running]);
  if (hidden) return null;
  const p = m && m.progress;
  const r = m && m.result;
  return (
    <section class="card migration" aria-labelledby="h-mig" data-testid="migration-progress" aria-busy={running ? 'true' : 'false'}>
      <h2 id="h-mig">Migration {m ? `${m.source} → ${m.destination}` : ''} <StateBadge state={m ? m.phase : 'pending'} testid="migration-phase" /></h2>
      <ErrorText error={error} />
      {m && m.error && <p class="error-text" data-testid="error-text">{m.error}</p>}
      {p && running && (
        <>
          {p.disk_total > 0 && m.phase === 'copying-disk' && (
            <div class="mig-row"><span>Disk {fmtBytes(p.disk_copied)} / {fmtBytes(p.disk_total)}</span>
              <Progress value={p.disk_copied} max={p.disk_total} label="Disk copied" /></div>
          )}
          <div class="mig-row"><span>Memory sent {fmtBytes(p.ram_transferred)} / {fmtBytes(p.ram_total)}</span>
            <Progress value={p.ram_total - p.ram_remaining} max={p.ram_total} label="Memory sent" /></div>
          <dl class="props compact">
            <div><dt>Remaining</dt><dd>{fmtBytes(p.ram_remaining)}</dd></div>
            <div><dt>Dirty rate</dt><dd>{fmtRate(p.dirty_rate)}</dd></div>
            <div><dt>Throughput</dt><dd>{p.mbps.toFixed(0)} Mbit/s</dd></div>
            <div><dt>Expected downtime</dt><dd>{fmtMs(p.expected_downtime_ms)}</dd></div>
            <div><dt>Pass</dt><dd>{p.iteration}</dd></div>
            {p.throttle_percent > 0 && <div><dt>Throttle</dt><dd>{p.throttle_percent}%</dd></div>}
          </dl>
        </>
      )}
      {r && (
        <dl class="props compact" data-testid="migration-result">
          <div><dt>Total time</dt><dd>{fmtMs(r.total_ms)}</dd></div>
          <div><dt>Guest paused</dt><dd>{fmtMs(r.pause_ms)}</dd></div>
          <div><dt>QEMU downtime</dt><dd>{fmtMs(r.qemu_downtime_ms)}</dd></div>
          <div><dt>Memory sent</dt><dd>{fmtBytes(r.ram_transferred)}</dd></div>
          <div><dt>Disk copied</dt><dd>{fmtBytes(r.disk_copied)}</dd></div>
          <div><dt>Streams</dt><dd>{r.encrypted ? 'mutual TLS' : 'plain'}</dd></div>
        </dl>
      )}
      <div class="actions">
        {running && canCancel && <button type="button" onClick={() => api.post(`/v1/instances/${enc(name)}/migrate/cancel`).catch(setError)}>Cancel migration</button>}
        {!running && <button type="button" onClick={() => setHidden(true)}>Dismiss</button>}
      </div>
    </section>
  );
}

function Snapshots({ inst, canWrite, onChanged }) {
  const name = inst.spec.name;
  const list = useFetch(`/v1/instances/${enc(name)}/snapshots`);
  const [dialog, setDialog] = useState(null);
  const [rowError, setRowError] = useState({});
  const snaps = list.data || [];
  const pending = snaps.some((s) => s.state === 'pending' || s.state === 'saving' || s.deleting);
  useEvents((ev) => {
    if (ev.object === 'snapshot' && ev.name.startsWith(`${name}/`) && inProject(ev)) list.reload();
  });
  // Progress of snapshots being written (a progress poll, not list state).
  useInterval(() => { if (pending) list.reload(); }, 1000, [pending]);
  return (
    <section aria-labelledby="h-snaps">
      <div class="page-head">
        <h2 id="h-snaps">Snapshots</h2>
        {canWrite && <button type="button" onClick={() => setDialog({ kind: 'take' })} data-testid="take-snapshot">Take snapshot</button>}
      </div>
      <ErrorText error={list.error} />
      {!list.data && !list.error ? <Loading what="snapshots" /> : list.data && (
        <Table caption="Snapshots" head={['Name', 'State', 'Kind', 'Size', 'Paused', 'Origin', 'Taken', ...(canWrite ? ['Actions'] : [])]} testid="snapshots-table"
          empty={snaps.length ? null : 'No snapshots.'}>
          {snaps.map((s) => (
            <Fragment key={s.name}>
              <tr data-testid={`snapshot-row-${s.name}`}>
                <td data-label="Name">{s.name}</td>
                <td data-label="State"><StateBadge state={s.deleting ? 'deleting' : s.state} testid="snapshot-state" />
                  {s.progress && s.state !== 'ready' && <Progress value={s.progress.ram_total - s.progress.ram_remaining} max={s.progress.ram_total} label={`Snapshot ${s.name} progress`} />}
                  {s.message && <small class="muted block">{s.message}</small>}</td>
                <td data-label="Kind">{s.kind || '–'}</td>
                <td data-label="Size">{fmtBytes(s.disk_bytes + s.memory_bytes)}</td>
                <td data-label="Paused">{s.paused_ms != null ? fmtMs(s.paused_ms) : '–'}</td>
                <td data-label="Origin">{s.origin || 'manual'}</td>
                <td data-label="Taken">{ago(s.taken_at || s.created_at)}</td>
                {canWrite && (
                  <td data-label="Actions" class="row-actions">
                    <button type="button" disabled={s.state !== 'ready'} onClick={() => setDialog({ kind: 'restore', s })} data-testid="snapshot-restore">Restore</button>
                    <button type="button" disabled={s.state !== 'ready'} onClick={() => setDialog({ kind: 'clone', s })} data-testid="snapshot-clone">Clone</button>
                    <button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', s })} data-testid="snapshot-delete">Delete</button>
                  </td>
                )}
              </tr>
              {rowError[s.name] && <tr key={`${s.name}-err`}><td colSpan={8}><ErrorText error={rowError[s.name]} /></td></tr>}
            </Fragment>
          ))}
        </Table>
      )}
      {dialog && dialog.kind === 'take' && <TakeSnapshotDialog name={name} onClose={() => { setDialog(null); list.reload(); }} />}
      {dialog && dialog.kind === 'restore' && (
        <ConfirmDialog title={`Restore ${name} to ${dialog.s.name}?`} confirmLabel="Restore"
          message={`${name} goes back to the snapshot's memory and disk; what happened since is lost.`}
          onConfirm={() => api.post(`/v1/instances/${enc(name)}/restore`, { snapshot: dialog.s.name })}
          onClose={(ok) => { setDialog(null); if (ok) { announce('Restore requested'); onChanged(); } }} />
      )}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete snapshot ${dialog.s.name}?`} danger confirmLabel="Delete"
          message="Its files are deleted on the host that keeps them."
          onConfirm={() => api.del(`/v1/instances/${enc(name)}/snapshots/${enc(dialog.s.name)}`)}
          onClose={(ok) => { setDialog(null); if (ok) list.reload(); }} />
      )}
      {dialog && dialog.kind === 'clone' && (
        <CreateInstanceDialog fromSnapshot={`${name}/${dialog.s.name}`} onClose={() => setDialog(null)}
          onCreated={(i) => { announce(`Clone ${i.spec.name} created`); go(`/instances/${enc(i.spec.name)}`); }} />
      )}
    </section>
  );
}

function toSeries(points, key, scale = 1) {
  return points.filter((p) => p[key] != null).map((p) => [Date.parse(p.at), p[key] * scale]);
}

function InstanceMetrics({ name }) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  useInterval(() => {
    api.get(`/v1/instances/${enc(name)}/metrics`, { query: { minutes: 60 } }).then((r) => { setData(r); setError(null); }, setError);
  }, 15000, [name]);
  if (error && !data) return <ErrorText error={error} />;
  if (!data) return <Loading what="metrics" />;
  const pts = data.points || [];
  return (
    <section aria-labelledby="h-metrics" class="charts" data-testid="instance-metrics">
      <h2 id="h-metrics" class="sr-only">Metrics, last hour</h2>
      {!pts.length && <p class="muted">No samples in the last hour yet.</p>}
      <Chart title="CPU" series={[{ name: 'cpu', color: 'var(--c1)', values: toSeries(pts, 'cpu_percent') }]} fmt={(v) => fmtPct(v)} />
      <Chart title="Memory" series={[{ name: 'used', color: 'var(--c2)', values: toSeries(pts, 'memory_bytes') }]} fmt={(v) => fmtBytes(v, 0)} />
      <Chart title="Disk" series={[
        { name: 'read', color: 'var(--c1)', values: toSeries(pts, 'disk_read_bps') },
        { name: 'write', color: 'var(--c3)', values: toSeries(pts, 'disk_write_bps') },
      ]} fmt={fmtRate} />
      <Chart title="Network" series={[
        { name: 'rx', color: 'var(--c2)', values: toSeries(pts, 'net_rx_bps') },
        { name: 'tx', color: 'var(--c4)', values: toSeries(pts, 'net_tx_bps') },
      ]} fmt={fmtRate} />
    </section>
  );
}
