// The shell: sign-in, header (project switcher, identity, sign out), nav,
// reconnecting banner, and the page for the current hash route.
import { useEffect, useState } from 'preact/hooks';
import { api } from './api.js';
import { SessionContext, permissions } from './session.js';
import { startEvents, stopEvents } from './live.js';
import { useRoute } from './route.js';
import { ErrorText, LiveRegion } from './components/ui.jsx';
import { SignIn } from './pages/signin.jsx';
import { InstancesPage } from './pages/instances.jsx';
import { InstancePage } from './pages/instance.jsx';
import { HostsPage } from './pages/hosts.jsx';
import { VolumesPage } from './pages/volumes.jsx';
import { NetworksPage } from './pages/networks.jsx';
import { SecurityGroupsPage } from './pages/security-groups.jsx';
import { GroupsPage } from './pages/groups.jsx';
import { LoadBalancersPage } from './pages/load-balancers.jsx';
import { ImagesPage } from './pages/images.jsx';
import { EventsPage } from './pages/events.jsx';
import { UsagePage } from './pages/usage.jsx';

const NAV = [
  ['instances', 'Instances'],
  ['hosts', 'Hosts'],
  ['volumes', 'Volumes'],
  ['networks', 'Networks'],
  ['security-groups', 'Security groups'],
  ['groups', 'Groups'],
  ['load-balancers', 'Load balancers'],
  ['images', 'Images'],
  ['events', 'Events'],
  ['usage', 'Usage'],
];

function Page({ parts }) {
  const [top, name, sub] = parts;
  switch (top) {
    case undefined:
    case 'instances': return name ? <InstancePage key={name} name={name} tab={sub || 'overview'} /> : <InstancesPage />;
    case 'hosts': return <HostsPage selected={name} />;
    case 'volumes': return <VolumesPage />;
    case 'networks': return <NetworksPage />;
    case 'security-groups': return <SecurityGroupsPage />;
    case 'groups': return <GroupsPage />;
    case 'load-balancers': return <LoadBalancersPage />;
    case 'images': return <ImagesPage />;
    case 'events': return <EventsPage />;
    case 'usage': return <UsagePage />;
    default: return <p>No such page. <a href="#/instances">Instances</a></p>;
  }
}

function useClientFlag(name, initial) {
  const [v, setV] = useState(initial);
  useEffect(() => api.on((what, val) => { if (what === name) setV(val); }), []);
  return v;
}

export function App() {
  const route = useRoute();
  const [token, setToken] = useState(api.token);
  const [whoami, setWhoami] = useState(null);
  const [projects, setProjects] = useState([]);
  const [project, setProject] = useState(api.project);
  const [loadError, setLoadError] = useState(null);
  const [signinError, setSigninError] = useState(null);
  const [menuOpen, setMenuOpen] = useState(false);
  const [attempt, setAttempt] = useState(0);
  const reconnecting = useClientFlag('reconnecting', api.reconnecting);

  // A 401 anywhere: back to sign-in, keeping the hash route.
  useEffect(() => api.on((what, err) => {
    if (what === 'unauthorized') {
      stopEvents();
      api.setToken(null);
      setSigninError(err && err.message ? `Signed out: ${err.message}` : null);
      setToken(null);
      setWhoami(null);
    }
  }), []);

  // Load the identity (and the servers for failover) once signed in.
  useEffect(() => {
    if (!token) return;
    let alive = true;
    setLoadError(null);
    (async () => {
      try {
        const w = await api.get('/v1/whoami');
        if (!alive) return;
        const id = w.identity || {};
        let names = Object.keys(id.roles || {});
        if (id.cluster_admin) {
          try { names = (await api.get('/v1/projects')).map((p) => p.name); } catch { /* keep roles */ }
        }
        if (w.project && !names.includes(w.project) && (id.cluster_admin || w.role)) names.push(w.project);
        names.sort();
        let p = api.project;
        if (!p || !names.includes(p)) p = names.includes(w.project) ? w.project : names[0] || w.project;
        api.setProject(p);
        setProjects(names);
        setProject(p);
        setWhoami(w);
        api.get('/v1/servers').then((s) => api.setServers(s), () => {
          api.get('/v1/info').then((i) => api.setServers(i.servers || []), () => {});
        });
      } catch (e) {
        if (alive && e.status !== 401) setLoadError(e);
      }
    })();
    return () => { alive = false; };
  }, [token, attempt]);

  const perms = permissions(whoami, project);

  // One event stream for the session (cluster-wide for cluster admins).
  useEffect(() => {
    if (!token || !whoami) return undefined;
    if (!perms.canRead && !perms.clusterAdmin) return undefined;
    startEvents(perms.clusterAdmin);
    return () => stopEvents();
  }, [token, whoami, project]);

  const signIn = (t, w) => { api.setToken(t); setSigninError(null); setToken(t); setWhoami(null); };
  const signOut = () => { stopEvents(); api.setToken(null); setToken(null); setWhoami(null); setSigninError(null); };
  const switchProject = (p) => { api.setProject(p); setProject(p); };

  if (!token) return (<><LiveRegion /><SignIn onSignedIn={signIn} notice={signinError} /></>);

  const banner = reconnecting && (
    <div class="banner" role="alert" data-testid="reconnecting-banner">Connection lost — reconnecting to another server…</div>
  );

  if (!whoami) {
    return (
      <div class="boot">
        {banner}
        <LiveRegion />
        {loadError ? (
          <div class="card">
            <ErrorText error={loadError} />
            <button type="button" onClick={() => setAttempt(attempt + 1)}>Retry</button>
            <button type="button" onClick={signOut}>Sign out</button>
          </div>
        ) : <p class="muted" role="status">Signing in…</p>}
      </div>
    );
  }

  const top = route.parts[0] || 'instances';
  const session = { whoami, project, projects, perms, switchProject };
  return (
    <SessionContext.Provider value={session}>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById('main').focus(); }}>Skip to content</a>
      <header class="top">
        <button type="button" class="icon menu-btn" aria-expanded={menuOpen ? 'true' : 'false'} aria-controls="nav"
          aria-label="Menu" onClick={() => setMenuOpen(!menuOpen)}>☰</button>
        <a class="brand" href="#/instances">Skyvisor</a>
        <div class="top-right">
          <label for="project-switcher" class="sr-only">Project</label>
          <select id="project-switcher" data-testid="project-switcher" value={project}
            onChange={(e) => switchProject(e.currentTarget.value)}>
            {projects.map((p) => <option key={p} value={p}>{p}</option>)}
          </select>
          <span class="who" data-testid="identity" title={`role: ${perms.role || 'none'}`}>
            {whoami.identity.name}<span class="role"> · {perms.role || 'no role'}</span>
          </span>
          <button type="button" onClick={signOut} data-testid="sign-out">Sign out</button>
        </div>
      </header>
      {banner}
      <LiveRegion />
      <div class="layout">
        <nav id="nav" class={`side${menuOpen ? ' open' : ''}`} aria-label="Main">
          <ul>
            {NAV.map(([id, label]) => (
              <li key={id}><a href={`#/${id}`} aria-current={top === id ? 'page' : undefined} data-testid={`nav-${id}`}
                onClick={() => setMenuOpen(false)}>{label}</a></li>
            ))}
          </ul>
        </nav>
        <main id="main" tabIndex={-1} key={project}>
          {!perms.canRead && !perms.clusterAdmin
            ? <p class="notice">This identity has no role in project “{project}”{perms.clusterMonitor ? ' (a cluster monitor sees metrics only)' : ''}.</p>
            : <Page parts={route.parts} />}
        </main>
      </div>
    </SessionContext.Provider>
  );
}
