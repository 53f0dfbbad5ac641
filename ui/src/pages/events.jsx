// Events: a live feed, newest on top, filtered by object text.
import { useEffect, useMemo, useState } from 'preact/hooks';
import { api } from '../api.js';
import { inProject, useEvents, useStreamState } from '../live.js';
import { useSession } from '../session.js';
import { ErrorText, EventCells, Loading, Table } from '../components/ui.jsx';
import { fmtTime } from '../util.js';

const MAX = 1000;

export function EventsPage() {
  const { perms } = useSession();
  const [events, setEvents] = useState(null);
  const [error, setError] = useState(null);
  const [q, setQ] = useState('');
  const live = useStreamState();

  useEffect(() => {
    const query = { limit: 200 };
    if (perms.clusterAdmin) query.cluster = 'true';
    api.get('/v1/events', { query }).then((r) => {
      setEvents((cur) => {
        const seen = new Set((cur || []).map((e) => `${e.seq}/${e.kind}/${e.name}`));
        const merged = [...(cur || []), ...r.filter((e) => !seen.has(`${e.seq}/${e.kind}/${e.name}`))];
        return merged.sort((a, b) => (b.seq || 0) - (a.seq || 0)).slice(0, MAX);
      });
    }, setError);
  }, [api.project]);

  useEvents((ev) => {
    if (!perms.clusterAdmin && !inProject(ev)) return;
    setEvents((cur) => {
      const list = cur || [];
      if (list.some((e) => e.seq === ev.seq && e.kind === ev.kind && e.name === ev.name)) return cur;
      return [ev, ...list].sort((a, b) => (b.seq || 0) - (a.seq || 0)).slice(0, MAX);
    });
  });

  const shown = useMemo(() => {
    const s = q.trim().toLowerCase();
    return (events || []).filter((e) => !s || `${e.object} ${e.name} ${e.project || ''} ${e.kind} ${e.message} ${e.host || ''}`.toLowerCase().includes(s));
  }, [events, q]);

  return (
    <section aria-labelledby="h-events">
      <div class="page-head">
        <h1 id="h-events">Events</h1>
        <span class={`live-dot${live ? ' on' : ''}`} role="status">{live ? 'live' : 'connecting…'}</span>
      </div>
      <div class="filters" role="search">
        <label for="ev-filter" class="sr-only">Filter by object</label>
        <input id="ev-filter" type="search" placeholder="Filter: object, name, event, message…" value={q}
          onInput={(e) => setQ(e.currentTarget.value)} data-testid="events-filter" />
      </div>
      <ErrorText error={error} />
      {!events && !error ? <Loading what="events" /> : events && (
        <Table caption="Events, newest first" testid="events-table"
          head={['Seq', 'Time', ...(perms.clusterAdmin ? ['Project'] : []), 'Object', 'Event', 'By', 'Message']}
          empty={shown.length ? null : 'No events.'}>
          {shown.map((e) => (
            <tr key={`${e.seq}/${e.kind}/${e.name}`} data-testid="event-row">
              <td data-label="Seq">{e.seq}</td>
              <td data-label="Time">{fmtTime(e.at)}</td>
              {perms.clusterAdmin && <td data-label="Project">{e.project || '–'}</td>}
              <td data-label="Object">{e.object} {e.object === 'instance' && (!e.project || e.project === api.project)
                ? <a href={`#/instances/${encodeURIComponent(e.name)}`}>{e.name}</a> : e.name}</td>
              <EventCells e={e} />
            </tr>
          ))}
        </Table>
      )}
    </section>
  );
}
