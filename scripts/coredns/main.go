// CoreDNS with only the plugins the dev cluster's real node uses, so the build skips the
// cloud back ends (route53, azure, clouddns, ...) of the full distribution. This is the
// documented way to choose plugins at compile time: a main package that imports them.
// Built by scripts/node-bin.sh; the Corefile is written by tools/sft_devcluster/node.py.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func main() {
	coremain.Run()
}
