// Hosts: state, capacity vs allocation bars, cluster admin actions
// (cordon/uncordon/drain/undrain/rebalance), failover history, host charts.
import { Fragment } from 'preact';
import { useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useEvents, useFetch, useInterval, useLiveList } from '../live.js';
import { useSession } from '../session.js';
import { href } from '../route.js';
import { Bar, Chart, ConfirmDialog, ErrorText, FormDialog, Field, Loading, StateBadge, Table, announce } from '../components/ui.jsx';
import { fmtBytes, fmtMiB, fmtPct, fmtRate, fmtTime } from '../util.js';

export function HostsPage({ selected }) {
  const { perms } = useSession();
  const hosts = useLiveList({
    list: '/v1/hosts',
    item: (n) => `/v1/hosts/${enc(n)}`,
    key: (h) => h.host.name,
    objects: ['host', 'instance'],
    cluster: true,
    // An instance's event changes its host's allocation: refetch that host.
    eventName: (ev) => (ev.object === 'host' ? ev.name : ev.host || null),
  });
  const [rowError, setRowError] = useState({});
  const [busy, setBusy] = useState({});
  const [dialog, setDialog] = useState(null);

  const act = async (name, what) => {
    setBusy({ ...busy, [name]: what }); setRowError({ ...rowError, [name]: null });
    try {
      const h = await api.post(`/v1/hosts/${enc(name)}/${what}`);
      if (h && h.host) hosts.upsert(h);
      announce(`${what} ${name}: ${h ? h.state : 'done'}`);
    } catch (e) { setRowError((r) => ({ ...r, [name]: e })); announce(`Error: ${e.message}`); }
    setBusy((b) => ({ ...b, [name]: null }));
  };

  // While a host drains, its record is the progress (instances left).
  const draining = (hosts.items || []).some((h) => h.state === 'draining');
  useInterval(() => { if (draining) (hosts.items || []).filter((h) => h.state === 'draining').forEach((h) => hosts.refetch(h.host.name)); }, 2000, [draining]);

  const items = hosts.items || [];
  const head = ['Host', 'State', 'vCPU', 'Memory', 'Disk', 'Instances', 'Accel'];
  if (perms.clusterAdmin) head.push('Actions');
  return (
    <section aria-labelledby="h-hosts">
      <div class="page-head">
        <h1 id="h-hosts">Hosts</h1>
        {perms.clusterAdmin && <button type="button" onClick={() => setDialog('rebalance')} data-testid="host-rebalance">Rebalance</button>}
      </div>
      <ErrorText error={hosts.error} />
      {!hosts.items && !hosts.error ? <Loading what="hosts" /> : hosts.items && (
        <Table caption="Hosts" head={head} testid="hosts-table" empty={items.length ? null : 'No hosts.'}>
          {items.map((h) => {
            const n = h.host.name;
            const cap = h.host.capacity.allocatable;
            const al = h.allocated;
            return (
              <Fragment key={n}>
                <tr data-testid={`host-row-${n}`} class={selected === n ? 'selected' : ''}>
                  <td data-label="Host"><a href={href('hosts', n)} aria-current={selected === n ? 'true' : undefined}>{n}</a><small class="muted block">{h.host.address}</small></td>
                  <td data-label="State" data-testid="host-state"><StateBadge state={h.state} />
                    {h.state === 'draining' && <small class="block">{h.instances} instance{h.instances === 1 ? '' : 's'} left</small>}</td>
                  <td data-label="vCPU"><Bar value={al.vcpus} max={cap.vcpus} label={`vCPU of ${n}`} text={`${al.vcpus} / ${cap.vcpus}`} /></td>
                  <td data-label="Memory"><Bar value={al.memory_mib} max={cap.memory_mib} label={`Memory of ${n}`} text={`${fmtMiB(al.memory_mib)} / ${fmtMiB(cap.memory_mib)}`} /></td>
                  <td data-label="Disk"><Bar value={al.disk_gib} max={cap.disk_gib} label={`Disk of ${n}`} text={`${al.disk_gib} / ${cap.disk_gib} GiB`} /></td>
                  <td data-label="Instances">{h.instances}</td>
                  <td data-label="Accel">{h.host.accel}</td>
                  {perms.clusterAdmin && (
                    <td data-label="Actions" class="row-actions">
                      {h.state === 'ready' && <button type="button" disabled={!!busy[n]} onClick={() => act(n, 'cordon')} data-testid="host-action-cordon">Cordon</button>}
                      {h.state === 'cordoned' && <button type="button" disabled={!!busy[n]} onClick={() => act(n, 'uncordon')} data-testid="host-action-uncordon">Uncordon</button>}
                      {(h.state === 'ready' || h.state === 'cordoned') && <button type="button" disabled={!!busy[n]} onClick={() => setDialog({ drain: n })} data-testid="host-action-drain">Drain</button>}
                      {(h.state === 'draining' || h.state === 'maintenance') && <button type="button" disabled={!!busy[n]} onClick={() => act(n, 'undrain')} data-testid="host-action-undrain">Undrain</button>}
                    </td>
                  )}
                </tr>
                {rowError[n] && <tr><td colSpan={head.length}><ErrorText error={rowError[n]} /></td></tr>}
              </Fragment>
            );
          })}
        </Table>
      )}
      {selected && <HostMetrics name={selected} />}
      {perms.clusterAdmin && <Failovers />}
      {dialog && dialog.drain && (
        <ConfirmDialog title={`Drain ${dialog.drain}?`} confirmLabel="Drain"
          message="No new instances go there, and its running VMs move away one at a time (live migration)."
          onConfirm={async () => { const h = await api.post(`/v1/hosts/${enc(dialog.drain)}/drain`); if (h && h.host) hosts.upsert(h); }}
          onClose={() => setDialog(null)} />
      )}
      {dialog === 'rebalance' && <RebalanceDialog onClose={() => setDialog(null)} />}
    </section>
  );
}

function RebalanceDialog({ onClose }) {
  const [max, setMax] = useState('');
  const [plan, setPlan] = useState(null);
  if (plan) {
    return (
      <FormDialog title="Rebalance planned" submitLabel="OK" onSubmit={async () => {}} onClose={onClose} testid="rebalance-plan">
        {() => (
          <>
            <p>Memory spread {fmtPct(plan.spread_before_percent, 1)} → {fmtPct(plan.spread_after_percent, 1)}; {plan.moves.length} move(s), one migration at a time.</p>
            <ul>{plan.moves.map((m) => <li key={m.instance}>{m.project ? `${m.project}/` : ''}{m.instance}: {m.from} → {m.to}</li>)}</ul>
          </>
        )}
      </FormDialog>
    );
  }
  return (
    <FormDialog title="Rebalance hosts" submitLabel="Rebalance" testid="rebalance-dialog" onClose={(ok) => { if (!ok) onClose(); }}
      onSubmit={async () => { const p = await api.post('/v1/hosts/rebalance', max ? { max_moves: Number(max) } : {}); setPlan(p); return false; }}>
      {(error) => (
        <Field label="Most moves (optional)" name="max_moves" error={error}>
          {(id, a) => <input id={id} {...a} type="number" min="1" value={max} onInput={(e) => setMax(e.currentTarget.value)} />}
        </Field>
      )}
    </FormDialog>
  );
}

function Failovers() {
  const f = useFetch('/v1/failovers');
  useEvents((ev) => { if (ev.kind === 'failed-over' || ev.kind === 'fenced') f.reload(); });
  const items = (f.data || []).slice().sort((a, b) => (a.declared_dead_at < b.declared_dead_at ? 1 : -1));
  return (
    <section aria-labelledby="h-failovers">
      <h2 id="h-failovers">Failover history</h2>
      <ErrorText error={f.error} />
      {f.data && (
        <Table caption="Failovers" head={['Declared dead', 'Instance', 'From', 'To', 'Outcome', 'Reason']} testid="failovers-table"
          empty={items.length ? null : 'No failovers.'}>
          {items.map((r) => (
            <tr key={r.id}>
              <td data-label="Declared dead">{fmtTime(r.declared_dead_at)}</td>
              <td data-label="Instance">{r.project ? `${r.project}/` : ''}{r.instance}</td>
              <td data-label="From">{r.from_host}</td>
              <td data-label="To">{r.to_host || '–'}</td>
              <td data-label="Outcome"><StateBadge state={r.outcome} /></td>
              <td data-label="Reason">{r.reason}</td>
            </tr>
          ))}
        </Table>
      )}
    </section>
  );
}

function series(points, key) {
  return points.filter((p) => p[key] != null).map((p) => [Date.parse(p.at), p[key]]);
}

function HostMetrics({ name }) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  useInterval(() => {
    api.get(`/v1/hosts/${enc(name)}/metrics`, { query: { minutes: 60 } }).then((r) => { setData(r); setError(null); }, setError);
  }, 15000, [name]);
  const pts = (data && data.points) || [];
  const memTotal = pts.length ? pts[pts.length - 1].memory_total_bytes : null;
  return (
    <section aria-labelledby="h-hmetrics" class="charts" data-testid="host-metrics">
      <h2 id="h-hmetrics">{name}: last hour</h2>
      {error && !data && <ErrorText error={error} />}
      {!data && !error && <Loading what="metrics" />}
      {data && (
        <>
          <Chart title="CPU" series={[{ name: 'cpu', color: 'var(--c1)', values: series(pts, 'cpu_percent') }]} max={100} fmt={(v) => fmtPct(v)} />
          <Chart title="Memory" series={[{ name: 'used', color: 'var(--c2)', values: series(pts, 'memory_used_bytes') }]} max={memTotal || undefined} fmt={(v) => fmtBytes(v, 0)} />
          <Chart title="Network" series={[
            { name: 'rx', color: 'var(--c2)', values: series(pts, 'net_rx_bps') },
            { name: 'tx', color: 'var(--c4)', values: series(pts, 'net_tx_bps') },
          ]} fmt={fmtRate} />
          <Chart title="VMs running" series={[{ name: 'vms', color: 'var(--c3)', values: series(pts, 'vms_running') }]} fmt={(v) => v.toFixed(0)} />
        </>
      )}
    </section>
  );
}
