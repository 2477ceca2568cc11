// Package kubernetes checks the manifests beside it offline: every document is decoded strictly into the
// Kubernetes API types of its kind (an unknown or misspelt field, or a value of the wrong type, fails),
// and the DaemonSet must keep the security properties docs/deploy.md promises. This is a module of its
// own so that the relay's go.mod does not carry the Kubernetes API.
package kubernetes

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/config"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

const manifest = "sockrelay.yaml"

// kinds are the objects the manifest may hold, by apiVersion and kind.
var kinds = map[string]func() any{
	"v1/Namespace":      func() any { return new(corev1.Namespace) },
	"v1/ConfigMap":      func() any { return new(corev1.ConfigMap) },
	"apps/v1/DaemonSet": func() any { return new(appsv1.DaemonSet) },
}

// decodeManifest decodes every document of a multi-document YAML file strictly into its kind's type.
func decodeManifest(data []byte) ([]any, error) {
	var objs []any
	for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		newObj, ok := kinds[head.APIVersion+"/"+head.Kind]
		if !ok {
			return nil, fmt.Errorf("document %d: apiVersion %q kind %q is not one this check knows", i, head.APIVersion, head.Kind)
		}
		obj := newObj()
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			return nil, fmt.Errorf("document %d (%s): %w", i, head.Kind, err)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

// TestDecodeStrict: the decoder refuses what a schema check must refuse, so that passing means something.
func TestDecodeStrict(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"unknown field", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {}\nimmutible: true\n", `unknown field "immutible"`},
		{"wrong type", "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: a}\nspec: {template: {spec: {hostNetwork: yes-please}}}\n", "hostNetwork"},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n", `kind "Pod"`},
		{"duplicate field", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nmetadata: {name: b}\n", "metadata"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeManifest([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("decode: %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// unitCapabilities returns the capabilities the systemd unit grants, without the CAP_ prefix, sorted.
func unitCapabilities(t *testing.T) []string {
	t.Helper()
	unit, err := os.ReadFile("../../packaging/sockrelay.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^AmbientCapabilities=(.+)$`).FindSubmatch(unit)
	if m == nil {
		t.Fatal("packaging/sockrelay.service has no AmbientCapabilities")
	}
	var caps []string
	for _, c := range strings.Fields(string(m[1])) {
		caps = append(caps, strings.TrimPrefix(c, "CAP_"))
	}
	slices.Sort(caps)
	return caps
}

// TestManifest: the manifest decodes strictly, and the DaemonSet runs the relay on the host's network,
// unprivileged, as a non-root user, with exactly the unit's capabilities, probes on the admin
// listener's /healthz, and the ConfigMap's configuration, which the relay must accept.
func TestManifest(t *testing.T) {
	data, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeManifest(data)
	if err != nil {
		t.Fatalf("%s: %v", manifest, err)
	}
	var ds *appsv1.DaemonSet
	var cm *corev1.ConfigMap
	for _, o := range objs {
		switch o := o.(type) {
		case *appsv1.DaemonSet:
			ds = o
		case *corev1.ConfigMap:
			cm = o
		}
	}
	if ds == nil || cm == nil {
		t.Fatalf("%s: want a DaemonSet and a ConfigMap", manifest)
	}
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork {
		t.Error("the pod is not on the host's network")
	}
	if got := ds.Spec.Selector.MatchLabels; len(got) == 0 || !labelsMatch(got, ds.Spec.Template.Labels) {
		t.Errorf("selector %v does not select the template's labels %v", got, ds.Spec.Template.Labels)
	}
	psc := pod.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("pod securityContext %+v: want runAsNonRoot and a runAsUser other than 0", psc)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("the container has no securityContext.capabilities")
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Error("the container must say privileged: false")
	}
	// File capabilities (the image's) need privilege escalation allowed: no_new_privs would drop them.
	if sc.AllowPrivilegeEscalation == nil || !*sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation must be true for the binary's file capabilities to apply")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities dropped %v, want [ALL]", sc.Capabilities.Drop)
	}
	var added []string
	for _, a := range sc.Capabilities.Add {
		added = append(added, string(a))
	}
	slices.Sort(added)
	if want := unitCapabilities(t); !slices.Equal(added, want) {
		t.Errorf("capabilities added %v, want the unit's %v", added, want)
	}

	cfgText, ok := cm.Data["sockrelay.yaml"]
	if !ok {
		t.Fatal("the ConfigMap has no sockrelay.yaml")
	}
	cfg, err := config.Parse("ConfigMap sockrelay.yaml", []byte(cfgText))
	if err != nil {
		t.Fatalf("the relay refuses the ConfigMap's configuration: %v", err)
	}
	checkMount(t, c, pod.Volumes, cm.Name)
	checkProbes(t, c, cfg.Admin)
	if grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second; grace <= cfg.Timeouts.Shutdown {
		t.Errorf("terminationGracePeriodSeconds %v is not longer than the drain (timeouts.shutdown %v)", grace, cfg.Timeouts.Shutdown)
	}
}

func labelsMatch(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// checkMount: the container's --config names a file of the ConfigMap, mounted where it says.
func checkMount(t *testing.T, c corev1.Container, volumes []corev1.Volume, configMap string) {
	t.Helper()
	i := slices.Index(c.Args, "--config")
	if i < 0 || i+1 >= len(c.Args) {
		t.Fatalf("args %v have no --config FILE", c.Args)
	}
	file := c.Args[i+1]
	for _, m := range c.VolumeMounts {
		for _, v := range volumes {
			if v.Name == m.Name && v.ConfigMap != nil && v.ConfigMap.Name == configMap && file == m.MountPath+"/sockrelay.yaml" {
				return
			}
		}
	}
	t.Errorf("--config %s is not the ConfigMap %s's sockrelay.yaml mounted in the container", file, configMap)
}

// checkProbes: readiness and liveness ask the admin listener's /healthz (relay/admin.go), on the address
// the configuration gives it: with hostNetwork, the node's loopback, where the kubelet runs.
func checkProbes(t *testing.T, c corev1.Container, admin string) {
	t.Helper()
	host, port, err := net.SplitHostPort(admin)
	if err != nil {
		t.Fatalf("admin %q: %v", admin, err)
	}
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("no %s probe by HTTP GET", name)
			continue
		}
		g := p.HTTPGet
		if g.Path != "/healthz" || g.Host != host || g.Port.String() != port {
			t.Errorf("%s probe GET %s:%s%s, want the admin listener's %s:%s/healthz", name, g.Host, g.Port.String(), g.Path, host, port)
		}
	}
}

// TestContainerfile: the image gives the binary exactly the unit's capabilities and runs as the user the
// DaemonSet names.
func TestContainerfile(t *testing.T) {
	cf, err := os.ReadFile("../../packaging/Containerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`setcap (\S+)=ep /usr/bin/sockrelay`).FindSubmatch(cf)
	if m == nil {
		t.Fatal("packaging/Containerfile does not setcap /usr/bin/sockrelay")
	}
	var caps []string
	for _, c := range strings.Split(string(m[1]), ",") {
		caps = append(caps, strings.ToUpper(strings.TrimPrefix(c, "cap_")))
	}
	slices.Sort(caps)
	if want := unitCapabilities(t); !slices.Equal(caps, want) {
		t.Errorf("the image's file capabilities %v, want the unit's %v", caps, want)
	}
	u := regexp.MustCompile(`(?m)^USER (\d+):(\d+)$`).FindSubmatch(cf)
	if u == nil {
		t.Fatal("packaging/Containerfile has no numeric USER uid:gid")
	}
	data, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(string(u[1]))
	if uid == 0 || !bytes.Contains(data, []byte("runAsUser: "+string(u[1]))) {
		t.Errorf("the image's USER %d is root or not the DaemonSet's runAsUser", uid)
	}
}
