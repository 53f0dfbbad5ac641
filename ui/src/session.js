// Session: the signed-in identity (GET /v1/whoami), its projects and what
// its role in the chosen project allows.
import { createContext } from 'preact';
import { useContext } from 'preact/hooks';

export const SessionContext = createContext(null);

export function useSession() { return useContext(SessionContext); }

// whoami: the WhoAmI answer; project: the chosen project.
export function permissions(whoami, project) {
  const id = (whoami && whoami.identity) || {};
  const clusterAdmin = !!id.cluster_admin;
  const clusterMonitor = !!id.cluster_monitor;
  const roles = id.roles || {};
  let role = roles[project] || null;
  if (!role && whoami && whoami.project === project) role = whoami.role || null;
  const canWrite = clusterAdmin || role === 'member' || role === 'admin';
  const canRead = clusterAdmin || !!role;
  return { clusterAdmin, clusterMonitor, role: clusterAdmin ? 'cluster admin' : role, canWrite, canRead, projectAdmin: clusterAdmin || role === 'admin' };
}
